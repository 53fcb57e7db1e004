/* Foal-Net try-it page: upload or record a clip, POST it to /predict, show the answer.
   Plain script, no build step, nothing loaded from the internet. */
'use strict';

// One-line agreement reading: mean of the two MEM match probabilities (documented in docs/web.md).
const AGREE_AT = 0.6;
const DISAGREE_BELOW = 0.4;
// AVEL cosine similarity colour bands, same as the help text.
const SIMILARITY_CLOSE_AT = 0.5;
const SIMILARITY_FAR_BELOW = 0.2;

const EMOTION_COLOURS = ['neutral', 'happy', 'sad', 'angry', 'fearful', 'disgust', 'surprised'];

// Friendly headlines per API error code; the server's own sentence is shown under them.
const ERROR_TITLES = {
  empty_upload: 'The file is empty',
  invalid_request: 'The request was not understood',
  unauthorized: 'Not authorised to use this service',
  too_large: 'That file is too large',
  unsupported_content_type: 'That does not look like a video',
  not_media: 'That does not look like a video',
  unsupported_codec: 'That video format is not supported',
  corrupt_media: 'The file seems to be damaged',
  no_usable_stream: 'There is no sound or picture to analyse',
  too_long: 'The clip is too long',
  decode_timeout: 'Reading the file took too long',
  overloaded: 'The service is busy right now',
  not_ready: 'The service is still starting',
  inference_failed: 'The model could not analyse this clip',
  storage_full: 'The server has run out of space',
  deadline_exceeded: 'The analysis took too long',
  internal_error: 'The service had a problem',
};
const STATUS_TITLES = {
  413: 'That file is too large',
  415: 'That does not look like a video',
  422: 'The clip could not be read',
  429: 'The service is busy right now',
  503: 'The service is unavailable right now',
  504: 'The analysis took too long',
};

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};
const SVG_NS = 'http://www.w3.org/2000/svg';
const svgEl = (tag, attrs) => {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};

const state = {
  info: null, // GET /info
  xhr: null, // the upload in flight
  recorder: null, // MediaRecorder while recording
  mediaUrl: null, // object URL of the clip in the player
  elapsedTimer: null,
  segments: [],
  total: 0, // clip seconds the timeline spans
  pointed: null, // window index under the pointer
  focused: null, // window index with keyboard focus
};

/* ---------- formatting ---------- */

const capital = (label) => label.charAt(0).toUpperCase() + label.slice(1);
const pct = (p) => `${Math.round(p * 100)}%`;
const NBSP = '\u00a0'; // keeps a number on the same line as its unit
function seconds(s) {
  if (s < 60) return `${s.toFixed(1)}${NBSP}s`;
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, '0')}`;
}
function bytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}${NBSP}GB`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}${NBSP}MB`;
  return `${Math.max(1, Math.round(n / 1e3))}${NBSP}kB`;
}
function colourOf(label) {
  return EMOTION_COLOURS.includes(label) ? `var(--e-${label})` : 'var(--e-other)';
}
function topOf(probabilities) {
  let best = null;
  for (const [label, p] of Object.entries(probabilities || {})) {
    if (best === null || p > best[1]) best = [label, p];
  }
  return best;
}
function durationWords(s) {
  if (s >= 120 && s % 60 === 0) return `${s / 60}${NBSP}minutes`;
  return `${Math.round(s)}${NBSP}seconds`;
}

/* ---------- status and errors ---------- */

/** Status line; `mode` adds a spinner ('busy') or a red dot ('recording'). */
function setStatus(text, mode = null) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('busy', mode === 'busy');
  status.classList.toggle('recording', mode === 'recording');
}
function showError(title, detail) {
  $('error-title').textContent = title;
  $('error-detail').textContent = detail || '';
  $('error').hidden = false;
  setStatus('');
}
function clearError() {
  $('error').hidden = true;
}
function showProgress(value) {
  $('progress-block').hidden = false;
  const bar = $('progress');
  if (value === null) bar.removeAttribute('value');
  else bar.value = value;
}
function hideProgress() {
  $('progress-block').hidden = true;
  clearInterval(state.elapsedTimer);
}
function startElapsed() {
  const started = performance.now();
  const show = () => {
    $('elapsed').textContent = `${Math.floor((performance.now() - started) / 1000)} s`;
  };
  clearInterval(state.elapsedTimer);
  show();
  state.elapsedTimer = setInterval(show, 1000);
}

/** Turns a non-200 answer into a readable message; never throws. */
function showApiError(xhr) {
  let body = null;
  try {
    body = JSON.parse(xhr.responseText);
  } catch (_) {
    body = null;
  }
  const code = body && body.error;
  let title = ERROR_TITLES[code] || STATUS_TITLES[xhr.status] ||
    (xhr.status >= 500 ? 'The service had a problem' : 'Something went wrong');
  let detail = (body && body.detail) || `The server answered HTTP ${xhr.status} without details.`;
  const retry = xhr.getResponseHeader('Retry-After');
  if (xhr.status === 429 && retry) detail += ` Try again in ${retry} s.`;
  if (!code && !body) title += ` (HTTP ${xhr.status})`;
  showError(title, detail);
  if (xhr.status === 401) {
    $('key-block').hidden = false;
    $('error-detail').textContent = $('api-key').value ? 'The API key was not accepted.' : 'Enter the API key, then choose the clip again.';
    $('api-key').focus();
  }
}

/* ---------- model information ---------- */

async function loadInfo(attempt = 0) {
  try {
    const res = await fetch('info', { headers: { Accept: 'application/json' } });
    if (res.status === 503 && attempt < 30) {
      // The model is still loading: say so and ask again shortly.
      $('model-info').textContent = 'The model is loading…';
      setTimeout(() => loadInfo(attempt + 1), 2000);
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    state.info = await res.json();
  } catch (err) {
    $('model-info').textContent = 'Model information is unavailable right now; you can still try a clip.';
    return;
  }
  const info = state.info;
  const parts = [];
  if (info.model) parts.push(`Model ${info.model.name} ${info.model.version}`);
  if (Array.isArray(info.labels)) parts.push(`${info.labels.length} emotions: ${info.labels.join(', ')}`);
  if (info.provider) parts.push(`runs on ${providerName(info.provider)}`);
  $('model-info').textContent = parts.join(' · ');

  if (info.auth) $('key-block').hidden = false;

  const maxBytes = maxUploadBytes();
  const maxSeconds = info.limits && info.limits.max_duration_s;
  if (maxBytes && maxSeconds) {
    $('limits').textContent = `Video with sound, up to ${bytes(maxBytes)} and ${durationWords(maxSeconds)}. A talking face works best.`;
  }
}
/** 'CUDAExecutionProvider' -> 'CUDA (GPU)', 'CPUExecutionProvider' -> 'CPU'. */
function providerName(provider) {
  const short = provider.replace(/ExecutionProvider$/, '');
  return short === 'CPU' ? 'CPU' : `${short} (GPU)`;
}
function maxUploadBytes() {
  return state.info && state.info.limits ? state.info.limits.max_upload_bytes : null;
}

/* ---------- upload ---------- */

function analyse(file) {
  clearError();
  if (state.xhr) state.xhr.abort();
  const maxBytes = maxUploadBytes();
  if (maxBytes && file.size > maxBytes) {
    showError(ERROR_TITLES.too_large, `“${file.name}” is ${bytes(file.size)}; the limit is ${bytes(maxBytes)}.`);
    return;
  }
  $('result').hidden = true;
  const form = new FormData();
  form.append('file', file, file.name);
  const xhr = new XMLHttpRequest();
  state.xhr = xhr;
  xhr.open('POST', 'predict');
  xhr.responseType = 'text';
  const key = $('api-key').value.trim();
  if (key) xhr.setRequestHeader('Authorization', `Bearer ${key}`);
  showProgress(0);
  startElapsed();
  setStatus(`Uploading ${file.name} (${bytes(file.size)})…`, 'busy');
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) showProgress((100 * e.loaded) / e.total);
  };
  xhr.upload.onload = () => {
    showProgress(null);
    setStatus('Uploaded. Analysing voice and face…', 'busy');
  };
  xhr.onload = () => {
    state.xhr = null;
    hideProgress();
    if (xhr.status !== 200) {
      showApiError(xhr);
      return;
    }
    let result;
    try {
      result = JSON.parse(xhr.responseText);
    } catch (_) {
      showError('The answer could not be read', 'The server sent something that is not JSON.');
      return;
    }
    render(result, file);
  };
  xhr.onerror = () => {
    state.xhr = null;
    hideProgress();
    showError('Could not reach the service', 'The connection failed. Check your network and that the server is running, then try again.');
  };
  xhr.onabort = () => {
    hideProgress();
    if (state.xhr === xhr) {
      state.xhr = null;
      setStatus('Cancelled.');
    }
  };
  xhr.send(form);
}

function cancel() {
  const xhr = state.xhr;
  if (xhr) xhr.abort();
}

/* ---------- recording ---------- */

function recordingSupported() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

async function toggleRecording() {
  const button = $('record-button');
  if (state.recorder && state.recorder.state === 'recording') {
    state.recorder.stop();
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
  const recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
  state.recorder = recorder;
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
  const timer = setTimeout(() => recorder.state === 'recording' && recorder.stop(), limit * 1000);

  recorder.ondataavailable = (e) => {
    if (e.data && e.data.size) chunks.push(e.data);
  };
  recorder.onstop = () => {
    clearInterval(tick);
    clearTimeout(timer);
    stream.getTracks().forEach((t) => t.stop());
    preview.srcObject = null;
    preview.hidden = true;
    countdown.textContent = '';
    button.textContent = 'Record';
    button.classList.remove('recording');
    state.recorder = null;
    const mime = recorder.mimeType || type || 'video/webm';
    const file = new File(chunks, `recording.${mime.includes('mp4') ? 'mp4' : 'webm'}`, { type: mime.split(';')[0] });
    if (!file.size) {
      showError('Nothing was recorded', 'The camera gave no data. Try again or upload a file.');
      return;
    }
    analyse(file);
  };
  recorder.start(250);
  button.textContent = 'Stop recording';
  button.classList.add('recording');
  setStatus(`Recording for ${limit} seconds. Press Stop recording to finish early.`, 'recording');
}

/* ---------- result: chart, modalities, gauges ---------- */

function barChart(list, probabilities, { small = false } = {}) {
  list.replaceChildren();
  list.classList.toggle('small', small);
  const top = topOf(probabilities);
  for (const [label, p] of Object.entries(probabilities)) {
    const item = el('li', 'bar');
    item.dataset.label = label;
    if (top && label === top[0]) item.classList.add('top');
    item.style.setProperty('--c', colourOf(label));
    const track = el('span', 'bar-track');
    const fill = el('span', 'bar-fill');
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    track.append(fill);
    track.setAttribute('aria-hidden', 'true');
    item.append(el('span', 'bar-label', label), track, el('span', 'bar-value', pct(p)));
    list.append(item);
  }
  return list;
}

function missingNote(text) {
  const box = el('div', 'missing');
  box.append(el('span', 'missing-icon', '⚠'), el('span', 'missing-text', text));
  box.firstChild.setAttribute('aria-hidden', 'true');
  return box;
}

/** Why a modality is absent, in words; null when it is present. */
function missingReason(kind, view) {
  if (kind === 'audio') return view && view.present ? null : 'No audio track: the result relies on the face alone.';
  const frames = view ? view.frames || 0 : 0;
  const withFace = view ? view.frames_with_face || 0 : 0;
  if (view && view.present && withFace > 0) return null;
  if (!frames) return 'No video stream: the result relies on the voice alone.';
  return `No face found in any of the ${frames} frames: the result relies on the voice alone.`;
}

function renderModality(kind, view) {
  const box = $(`${kind}-view`);
  box.replaceChildren();
  const reason = missingReason(kind, view);
  if (reason) {
    box.append(missingNote(reason));
    return;
  }
  if (!view.probabilities) return;
  const top = topOf(view.probabilities);
  const head = el('p', 'modality-top');
  head.append(document.createTextNode(kind === 'audio' ? 'The voice sounds ' : 'The face looks '));
  head.append(el('strong', null, top ? top[0] : 'unclear'));
  if (top) head.append(document.createTextNode(` (${pct(top[1])})`));
  box.append(head);
  if (kind === 'video') {
    box.append(el('p', 'hint', `Face found in ${view.frames_with_face} of ${view.frames} frames.`));
  }
  const list = el('ul', 'bars');
  list.setAttribute('aria-label', `${kind === 'audio' ? 'Voice' : 'Face'} probabilities`);
  box.append(barChart(list, view.probabilities, { small: true }));
}

/** The plain-language agreement reading for one alignment object (or null). */
function agreement(alignment, modalities) {
  if (!alignment) {
    const audioMissing = missingReason('audio', modalities && modalities.audio);
    const what = audioMissing ? 'there is no voice' : 'there is no face';
    return { cls: 'unknown', text: `Cannot compare voice and face: ${what} to compare with.` };
  }
  const match = (alignment.audio + alignment.video) / 2;
  if (match >= AGREE_AT) return { cls: 'agree', text: `Voice and face agree (${pct(match)} match).` };
  if (match < DISAGREE_BELOW) return { cls: 'disagree', text: `Voice and face disagree (${pct(match)} match).` };
  return { cls: 'partly', text: `Voice and face partly agree (${pct(match)} match).` };
}

function bandColour(value, goodAt, badBelow) {
  if (value >= goodAt) return '#047857';
  if (value < badBelow) return '#b91c1c';
  return '#b45309';
}

/** A half-circle SVG gauge; `fraction` in [0, 1] sets the fill. */
function gauge({ name, title, note, fraction, valueText, min, max, colour, ariaValue, ariaMin, ariaMax }) {
  const fig = el('figure', 'gauge');
  fig.dataset.gauge = name;
  fig.setAttribute('role', 'meter');
  fig.setAttribute('aria-label', title);
  fig.setAttribute('aria-valuemin', ariaMin);
  fig.setAttribute('aria-valuemax', ariaMax);
  fig.setAttribute('aria-valuenow', ariaValue);
  fig.setAttribute('aria-valuetext', valueText);
  const svg = svgEl('svg', { viewBox: '0 0 200 118', 'aria-hidden': 'true', focusable: 'false' });
  const arc = 'M 20 100 A 80 80 0 0 1 180 100';
  svg.append(svgEl('path', { d: arc, class: 'gauge-track', pathLength: '100' }));
  svg.append(svgEl('path', {
    d: arc, class: 'gauge-fill', pathLength: '100', stroke: colour,
    'stroke-dasharray': '100', 'stroke-dashoffset': String(100 - 100 * Math.max(0, Math.min(1, fraction))),
  }));
  const value = svgEl('text', { x: '100', y: '92', 'text-anchor': 'middle', class: 'gauge-value' });
  value.textContent = valueText;
  const lo = svgEl('text', { x: '20', y: '116', 'text-anchor': 'middle', class: 'gauge-scale' });
  lo.textContent = min;
  const hi = svgEl('text', { x: '180', y: '116', 'text-anchor': 'middle', class: 'gauge-scale' });
  hi.textContent = max;
  svg.append(value, lo, hi);
  const caption = el('figcaption', null, title);
  caption.append(el('span', 'gauge-note', note));
  fig.append(svg, caption);
  return fig;
}

function renderAlignment(alignment, modalities) {
  const reading = agreement(alignment, modalities);
  const line = $('alignment-reading');
  line.className = `reading ${reading.cls}`;
  line.textContent = reading.text;
  const box = $('gauges');
  box.replaceChildren();
  if (!alignment) return;
  const s = alignment.similarity;
  box.append(gauge({
    name: 'similarity', title: 'Similarity', note: 'AVEL, −1 to 1',
    fraction: (s + 1) / 2, valueText: s.toFixed(2), min: '−1', max: '1',
    colour: bandColour(s, SIMILARITY_CLOSE_AT, SIMILARITY_FAR_BELOW), ariaValue: s.toFixed(2), ariaMin: '-1', ariaMax: '1',
  }));
  for (const [name, title, note] of [['audio', 'Voice → face', 'MEM match, voice side'], ['video', 'Face → voice', 'MEM match, face side']]) {
    const p = alignment[name];
    box.append(gauge({
      name, title, note, fraction: p, valueText: pct(p), min: '0%', max: '100%',
      colour: bandColour(p, AGREE_AT, DISAGREE_BELOW), ariaValue: p.toFixed(2), ariaMin: '0', ariaMax: '1',
    }));
  }
}

/* ---------- timeline and player ---------- */

function renderTimeline(result) {
  const segments = result.segments || [];
  state.segments = segments;
  const total = result.duration_s || (segments.length ? segments[segments.length - 1].end : 0) || 1;
  state.total = total;
  const box = $('segments');
  box.replaceChildren();
  // Long clips: many thin blocks; drop their text and thick separators (the detail panel reads them).
  $('timeline').classList.toggle('dense', segments.length > 24);
  segments.forEach((seg, i) => {
    // Windows may overlap; draw each up to where the next one starts so every block stays visible.
    const shownEnd = i + 1 < segments.length ? Math.min(seg.end, segments[i + 1].start) : seg.end;
    const top = topOf(seg.probabilities);
    const button = el('button', 'segment', seg.emotion ? capital(seg.emotion) : 'No data');
    button.type = 'button';
    button.dataset.index = String(i);
    button.tabIndex = i === 0 ? 0 : -1;
    button.style.left = `${(100 * seg.start) / total}%`;
    button.style.width = `${(100 * Math.max(shownEnd - seg.start, 0.05)) / total}%`;
    if (seg.emotion) button.style.setProperty('--c', colourOf(seg.emotion));
    else button.classList.add('empty');
    const what = seg.emotion ? `${seg.emotion}${top ? `, ${pct(top[1])}` : ''}` : 'no voice or face';
    button.setAttribute('aria-label', `${seconds(seg.start)} to ${seconds(seg.end)}: ${what}`);
    button.addEventListener('mouseenter', () => readSegment('pointed', i));
    button.addEventListener('focus', () => {
      // Roving tab stop: the timeline is one Tab stop, and it remembers the last window read.
      document.querySelectorAll('.segment').forEach((b) => { b.tabIndex = b === button ? 0 : -1; });
      readSegment('focused', i);
    });
    button.addEventListener('mouseleave', () => readSegment('pointed', null));
    button.addEventListener('blur', () => readSegment('focused', null));
    button.addEventListener('click', () => seekTo(i));
    button.addEventListener('keydown', (e) => moveFocus(e, i));
    box.append(button);
  });
  const legend = $('legend');
  legend.replaceChildren();
  const seen = new Set(segments.map((seg) => seg.emotion));
  for (const label of Object.keys(result.probabilities || {}).filter((l) => seen.has(l))) {
    const item = el('li', null, label);
    item.style.setProperty('--c', colourOf(label));
    legend.append(item);
  }
  const axis = $('timeline-axis');
  axis.replaceChildren();
  for (const t of axisTicks(total)) {
    const tick = el('span', null, t < 60 ? `${t} s` : seconds(t));
    tick.style.left = `${(100 * t) / total}%`;
    if (t > 0.92 * total) tick.classList.add('end');
    axis.append(tick);
  }
  updateCurrent(0);
}

/** Round-second axis marks, at most six of them. */
function axisTicks(total) {
  const step = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find((d) => total / d <= 5) || 1200;
  const ticks = [];
  for (let t = 0; t <= total + 1e-6; t += step) ticks.push(Math.round(t * 10) / 10);
  return ticks;
}

function moveFocus(event, i) {
  const n = state.segments.length;
  const target = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: n - 1 }[event.key];
  if (target === undefined) return;
  event.preventDefault();
  const next = document.querySelector(`.segment[data-index="${Math.max(0, Math.min(n - 1, target))}"]`);
  if (!next) return;
  next.focus();
}

function segmentAt(t) {
  let current = 0;
  state.segments.forEach((seg, i) => {
    if (seg.start <= t) current = i;
  });
  return current;
}

/** The detail panel shows the window under the pointer, else the focused one, else the playing one. */
function readSegment(source, i) {
  state[source] = i;
  const shown = readIndex();
  document.querySelectorAll('.segment').forEach((b) => b.classList.toggle('active', Number(b.dataset.index) === shown));
  showSegmentDetail(shown === null ? segmentAt($('player').currentTime || 0) : shown, shown === null);
}
function readIndex() {
  return state.pointed !== null ? state.pointed : state.focused;
}

function showSegmentDetail(i, isPlaying) {
  const seg = state.segments[i];
  const box = $('segment-detail');
  box.replaceChildren();
  if (!seg) return;
  box.dataset.index = String(i);
  const title = el('h3', null, `Window ${i + 1} of ${state.segments.length} · ${seconds(seg.start)}–${seconds(seg.end)}`);
  if (isPlaying) title.append(el('span', 'muted', ' (at the play position)'));
  box.append(title);
  if (!seg.emotion || !seg.probabilities) {
    box.append(el('p', 'segment-top', 'Neither a voice nor a face in this window: nothing to read.'));
    return;
  }
  const top = topOf(seg.probabilities);
  const line = el('p', 'segment-top');
  line.append(document.createTextNode('Most likely '));
  line.append(el('strong', null, seg.emotion));
  if (top) line.append(document.createTextNode(` (${pct(top[1])})`));
  const reading = agreement(seg.alignment, null);
  const agree = el('p', `reading ${reading.cls}`, seg.alignment ? reading.text : 'Voice and face cannot be compared in this window (one of them is missing).');
  const list = el('ul', 'bars');
  list.setAttribute('aria-label', `Window ${i + 1} probabilities`);
  box.append(line, agree, barChart(list, seg.probabilities, { small: true }));
}

function updateCurrent(t) {
  const i = segmentAt(t);
  document.querySelectorAll('.segment').forEach((b) => {
    const on = Number(b.dataset.index) === i;
    b.classList.toggle('current', on);
    if (on) b.setAttribute('aria-current', 'true');
    else b.removeAttribute('aria-current');
  });
  $('playhead').style.left = `${Math.min(100, (100 * t) / (state.total || 1))}%`;
  if (readIndex() === null) showSegmentDetail(i, true);
}

function seekTo(i) {
  const player = $('player');
  const seg = state.segments[i];
  if (!seg) return;
  if (player.src) player.currentTime = seg.start + 0.01;
  updateCurrent(seg.start);
  showSegmentDetail(i, false);
}

/* ---------- result: putting it together ---------- */

function render(result, file) {
  const top = topOf(result.probabilities);
  $('winner-label').textContent = result.emotion;
  $('winner').style.setProperty('--c', colourOf(result.emotion));
  const audioMissing = missingReason('audio', result.modalities && result.modalities.audio);
  const videoMissing = missingReason('video', result.modalities && result.modalities.video);
  const source = audioMissing ? 'from the face alone' : videoMissing ? 'from the voice alone' : 'from voice and face';
  $('winner-detail').textContent = `${top ? pct(top[1]) : ''} likely, ${source}, over ${seconds(result.duration_s || 0)}.`;
  barChart($('fused-chart'), result.probabilities);

  renderModality('audio', result.modalities && result.modalities.audio);
  renderModality('video', result.modalities && result.modalities.video);
  renderAlignment(result.alignment, result.modalities);

  const player = $('player');
  if (state.mediaUrl) URL.revokeObjectURL(state.mediaUrl);
  state.mediaUrl = URL.createObjectURL(file);
  $('player-note').hidden = true;
  player.src = state.mediaUrl;
  state.pointed = null;
  state.focused = null;
  renderTimeline(result);

  const facts = $('run-facts');
  facts.replaceChildren();
  const model = result.model || {};
  const rows = [
    ['Model', `${model.name || '?'} ${model.version || ''}`.trim()],
    ['Runs on', model.provider ? `${providerName(model.provider)} · ${model.provider}` : '?'],
    ['Clip length', seconds(result.duration_s || 0)],
    ['Windows', String((result.segments || []).length)],
  ];
  for (const [stage, ms] of Object.entries(result.timings_ms || {})) rows.push([`Time: ${stage}`, `${Math.round(ms)} ms`]);
  for (const [k, v] of rows) facts.append(el('dt', null, k), el('dd', null, v));

  $('result').hidden = false;
  setStatus(`Done: ${result.emotion}${top ? ` (${pct(top[1])})` : ''}.`);
  $('result-heading').focus({ preventScroll: true });
  $('result').scrollIntoView({ block: 'start' });
}

/* ---------- wiring ---------- */

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
  const player = $('player');
  player.addEventListener('timeupdate', () => updateCurrent(player.currentTime));
  player.addEventListener('seeked', () => updateCurrent(player.currentTime));
  player.addEventListener('error', () => {
    if (player.getAttribute('src')) $('player-note').hidden = false;
  });
  loadInfo();
}

wire();
