/* Foal-Net try-it page: upload or record a clip, POST it to /predict, show the answer as it streams.
   Plain ES modules, no build step, nothing loaded from the internet. This one wires the page:
   info.js (GET /info), upload.js (POST /predict, NDJSON), record.js (camera), result.js and
   charts.js (the answer), timeline.js (windows and player), status.js (progress and errors),
   format.js (DOM helpers and wording). */
import { $ } from './format.js';
import { loadInfo } from './info.js';
import { recordingSupported, toggleRecording } from './record.js';
import { wirePlayer } from './timeline.js';
import { analyse, cancel } from './upload.js';

function wire() {
  const input = $('file-input');
  input.addEventListener('change', () => {
    const file = input.files && input.files[0];
    if (file) analyse(file);
    input.value = '';
  });
  const zone = $('drop-zone');
  for (const type of ['dragenter', 'dragover']) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add('dragover');
    });
  }
  for (const type of ['dragleave', 'drop']) zone.addEventListener(type, () => zone.classList.remove('dragover'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) analyse(file);
  });
  // A file dropped beside the zone must not navigate away from the page.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());

  $('cancel-button').addEventListener('click', cancel);
  const recordButton = $('record-button');
  recordButton.addEventListener('click', toggleRecording);
  if (!recordingSupported()) {
    recordButton.disabled = true;
    $('record-seconds').disabled = true;
    $('record-hint').textContent = 'Recording is not available on this page: browsers allow the camera only over HTTPS or on localhost.';
  }
  wirePlayer();
  loadInfo();
}

wire();
