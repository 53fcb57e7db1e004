/* Recording a clip from the camera and microphone (MediaRecorder), then analysing it. */
import { $ } from './format.js';
import { clearError, setStatus, showError } from './status.js';
import { analyse } from './upload.js';

let recorder = null; // MediaRecorder while recording

export function recordingSupported() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

export async function toggleRecording() {
  const button = $('record-button');
  if (recorder && recorder.state === 'recording') {
    recorder.stop();
    return;
  }
  clearError();
  if (!recordingSupported()) {
    showError('Recording is not available here', 'This browser cannot record from a camera on this page (browsers allow it only over HTTPS or on localhost).');
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: true });
  } catch (err) {
    const refused = err && (err.name === 'NotAllowedError' || err.name === 'SecurityError');
    showError('Could not start the camera', refused
      ? 'Permission to use the camera and microphone was refused.'
      : `No camera or microphone could be opened (${err && err.name ? err.name : 'unknown error'}).`);
    return;
  }
  const preview = $('camera-preview');
  preview.srcObject = stream;
  preview.hidden = false;
  preview.play().catch(() => {});

  const type = ['video/webm;codecs=vp8,opus', 'video/webm', 'video/mp4'].find((t) => MediaRecorder.isTypeSupported(t));
  const rec = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
  recorder = rec;
  const chunks = [];
  const limit = Number($('record-seconds').value);
  // The countdown is aria-hidden: the live status line is announced once, not every second.
  const countdown = $('countdown');
  let left = limit;
  countdown.textContent = `${left} s left`;
  const tick = setInterval(() => {
    left = Math.max(0, left - 1);
    countdown.textContent = `${left} s left`;
  }, 1000);
  const timer = setTimeout(() => rec.state === 'recording' && rec.stop(), limit * 1000);

  rec.ondataavailable = (e) => {
    if (e.data && e.data.size) chunks.push(e.data);
  };
  rec.onstop = () => {
    clearInterval(tick);
    clearTimeout(timer);
    stream.getTracks().forEach((t) => t.stop());
    preview.srcObject = null;
    preview.hidden = true;
    countdown.textContent = '';
    button.textContent = 'Record';
    button.classList.remove('recording');
    recorder = null;
    const mime = rec.mimeType || type || 'video/webm';
    const file = new File(chunks, `recording.${mime.includes('mp4') ? 'mp4' : 'webm'}`, { type: mime.split(';')[0] });
    if (!file.size) {
      showError('Nothing was recorded', 'The camera gave no data. Try again or upload a file.');
      return;
    }
    analyse(file);
  };
  rec.start(250);
  button.textContent = 'Stop recording';
  button.classList.add('recording');
  setStatus(`Recording for ${limit} seconds. Press Stop recording to finish early.`, 'recording');
}
