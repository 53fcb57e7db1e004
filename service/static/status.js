/* The status line, the progress bar and the error box under the upload controls. */
import { $ } from './format.js';

// Friendly headlines per API error code; the server's own sentence is shown under them.
export const ERROR_TITLES = {
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

let elapsedTimer = null;

/** Status line; `mode` adds a spinner ('busy') or a red dot ('recording'). */
export function setStatus(text, mode = null) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('busy', mode === 'busy');
  status.classList.toggle('recording', mode === 'recording');
}

export function showError(title, detail) {
  $('error-title').textContent = title;
  $('error-detail').textContent = detail || '';
  $('error').hidden = false;
  setStatus('');
}

export function clearError() {
  $('error').hidden = true;
}

/** `value` in [0, 100], or null for "working, amount unknown"; `text` sits beside the bar. */
export function showProgress(value, text = '') {
  $('progress-block').hidden = false;
  const bar = $('progress');
  if (value === null) {
    bar.removeAttribute('value');
    bar.removeAttribute('aria-valuetext');
  } else {
    bar.value = value;
    if (text) bar.setAttribute('aria-valuetext', text);
    else bar.removeAttribute('aria-valuetext');
  }
  $('stream-count').textContent = text;
}

export function hideProgress() {
  $('progress-block').hidden = true;
  $('stream-count').textContent = '';
  clearInterval(elapsedTimer);
}

export function startElapsed() {
  const started = performance.now();
  const show = () => {
    $('elapsed').textContent = `${Math.floor((performance.now() - started) / 1000)} s`;
  };
  clearInterval(elapsedTimer);
  show();
  elapsedTimer = setInterval(show, 1000);
}

/** An error answer (`body` is its parsed JSON, or null) as a readable message; never throws. */
export function showApiError(status, body, retryAfter = null) {
  const code = body && body.error;
  let title = ERROR_TITLES[code] || STATUS_TITLES[status] ||
    (status >= 500 ? 'The service had a problem' : 'Something went wrong');
  let detail = (body && body.detail) || `The server answered HTTP ${status} without details.`;
  if (status === 429 && retryAfter) detail += ` Try again in ${retryAfter} s.`;
  if (!code && !body) title += ` (HTTP ${status})`;
  showError(title, detail);
  if (status === 401) {
    $('key-block').hidden = false;
    $('error-detail').textContent = $('api-key').value ? 'The API key was not accepted.' : 'Enter the API key, then choose the clip again.';
    $('api-key').focus();
  }
}
