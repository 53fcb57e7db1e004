/* POST /predict: the upload with its progress, then the answer as NDJSON (one line per window as
   soon as it is read, then the summary), so a long clip fills the timeline while it is analysed.
   A server that answers plain JSON (older ones) is read the same way, all at once. */
import { $, bytes } from './format.js';
import { labels, maxUploadBytes, windowSeconds } from './info.js';
import { hideResult, render, showPartial } from './result.js';
import {
  ERROR_TITLES, clearError, hideProgress, setStatus, showApiError, showError, showProgress, startElapsed,
} from './status.js';
import { addSegment, clipDuration, loadClip, resetTimeline, segmentCount, setTotal } from './timeline.js';

const NDJSON = 'application/x-ndjson';

let current = null; // the analysis in flight
let latest = null; // the last analysis started (its windows may stay on screen after it ends)

/** Complete JSON lines out of a response text that keeps growing. */
class LineReader {
  constructor() {
    this.offset = 0;
  }

  /** The objects of the lines completed since the last call (and the unterminated rest when
      `final`); throws SyntaxError on a line that is not JSON. */
  read(text, final) {
    const items = [];
    let end;
    while ((end = text.indexOf('\n', this.offset)) >= 0) {
      const line = text.slice(this.offset, end).trim();
      this.offset = end + 1;
      if (line) items.push(JSON.parse(line));
    }
    const rest = final ? text.slice(this.offset).trim() : '';
    if (rest) items.push(JSON.parse(rest));
    if (final) this.offset = text.length;
    return items;
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return null;
  }
}

const streamed = (xhr) => (xhr.getResponseHeader('Content-Type') || '').startsWith(NDJSON);

/** How many windows the clip will have, from its length in the player; null when unknown. */
function expectedWindows(run) {
  const duration = clipDuration();
  const window = windowSeconds() || (run.first ? run.first.end - run.first.start : null);
  if (!duration || !window) return null;
  // The server drops a tail under a second, hence "about" (~) and never fewer than already came.
  return Math.max(segmentCount(), Math.ceil(duration / window - 1e-6));
}

function showCount(run) {
  const n = segmentCount();
  const m = expectedWindows(run);
  if (m) showProgress((100 * n) / m, `${n} of ~${m} windows`);
  else showProgress(null, `${n} ${n === 1 ? 'window' : 'windows'} so far`);
}

function onSegment(run, seg) {
  if (!run.first) {
    run.first = seg;
    resetTimeline(clipDuration(), labels());
    showPartial();
    setStatus('Analysing: each window appears on the timeline as soon as it is read…', 'busy');
  }
  addSegment(seg);
  showCount(run);
}

/** Ends `run` once: no more progress, then `show` the outcome. */
function finish(run, show) {
  if (run.done) return;
  run.done = true;
  if (current === run) current = null;
  hideProgress();
  show();
}

/** A stream that stops early: say why, and that the windows already drawn are kept. */
function stopped(run, title, detail) {
  const n = segmentCount();
  const kept = !run.first ? '' : n === 1 ? ' The window read before it is shown below.' : ` The ${n} windows read before it are shown below.`;
  const sentence = /[.!?]$/.test(detail) ? detail : `${detail}.`;
  finish(run, () => showError(title, `${sentence}${kept}`));
}

/** The lines that have arrived so far (all of them when `final`). */
function take(run, final) {
  if (run.done) return;
  let items;
  try {
    items = run.reader.read(run.xhr.responseText, final);
  } catch (_) {
    stopped(run, 'The answer could not be read', 'The server sent a line that is not JSON.');
    return;
  }
  for (const item of items) {
    if (item && item.error) {
      stopped(run, ERROR_TITLES[item.error] || 'The analysis stopped', item.detail || `The service reported ${item.error}.`);
      return;
    }
    if (item && Array.isArray(item.segments)) {
      finish(run, () => render(item));
      return;
    }
    onSegment(run, item);
  }
  if (final) stopped(run, 'The answer was cut short', 'The service ended its answer before the result.');
}

function onLoad(run) {
  const { xhr } = run;
  if (xhr.status !== 200) {
    finish(run, () => showApiError(xhr.status, parseJson(xhr.responseText), xhr.getResponseHeader('Retry-After')));
    return;
  }
  if (streamed(xhr)) {
    take(run, true);
    return;
  }
  const result = parseJson(xhr.responseText);
  if (result && Array.isArray(result.segments)) finish(run, () => render(result));
  else finish(run, () => showError('The answer could not be read', 'The server sent something that is not JSON.'));
}

export function analyse(file) {
  clearError();
  if (current) current.xhr.abort();
  const maxBytes = maxUploadBytes();
  if (maxBytes && file.size > maxBytes) {
    showError(ERROR_TITLES.too_large, `“${file.name}” is ${bytes(file.size)}; the limit is ${bytes(maxBytes)}.`);
    return;
  }
  hideResult();
  loadClip(file); // the player reads the clip's length: the expected number of windows
  const xhr = new XMLHttpRequest();
  const run = { xhr, reader: new LineReader(), first: null, done: false };
  current = run;
  latest = run;
  const form = new FormData();
  form.append('file', file, file.name);
  xhr.open('POST', 'predict');
  xhr.responseType = 'text';
  xhr.setRequestHeader('Accept', `${NDJSON}, application/json;q=0.9`);
  const key = $('api-key').value.trim();
  if (key) xhr.setRequestHeader('Authorization', `Bearer ${key}`);
  showProgress(0);
  startElapsed();
  setStatus(`Uploading ${file.name} (${bytes(file.size)})…`, 'busy');
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable && !run.done) showProgress((100 * e.loaded) / e.total);
  };
  xhr.upload.onload = () => {
    if (run.done) return;
    showProgress(null);
    setStatus('Uploaded. Analysing voice and face…', 'busy');
  };
  $('player').addEventListener('loadedmetadata', () => {
    if (run !== latest || !run.first) return; // no windows drawn yet: they will span the clip
    setTotal(clipDuration());
    if (!run.done) showCount(run);
  }, { once: true });
  xhr.onprogress = () => {
    if (xhr.status === 200 && streamed(xhr)) take(run, false);
  };
  xhr.onload = () => onLoad(run);
  xhr.onerror = () => {
    if (run.first) stopped(run, 'The connection was lost', 'The answer stopped arriving before the result.');
    else finish(run, () => showError('Could not reach the service', 'The connection failed. Check your network and that the server is running, then try again.'));
  };
  xhr.onabort = () => {
    if (current === run) finish(run, () => setStatus('Cancelled.'));
  };
  xhr.send(form);
}

export function cancel() {
  if (current) current.xhr.abort();
}
