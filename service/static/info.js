/* GET /info: the model line in the header, the upload limits, the window length. */
import { $, bytes, durationWords, providerName } from './format.js';

let info = null;

export async function loadInfo(attempt = 0) {
  try {
    const res = await fetch('info', { headers: { Accept: 'application/json' } });
    if (res.status === 503 && attempt < 30) {
      // The model is still loading: say so and ask again shortly.
      $('model-info').textContent = 'The model is loading…';
      setTimeout(() => loadInfo(attempt + 1), 2000);
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    info = await res.json();
  } catch (err) {
    $('model-info').textContent = 'Model information is unavailable right now; you can still try a clip.';
    return;
  }
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

export function maxUploadBytes() {
  return info && info.limits ? info.limits.max_upload_bytes : null;
}

/** Seconds of clip one model window covers, or null when /info did not say. */
export function windowSeconds() {
  const spec = info && info.model && info.model.spec;
  return spec && spec.window_s > 0 ? spec.window_s : null;
}

/** The model's labels in its own order, or null. */
export function labels() {
  return info && Array.isArray(info.labels) ? info.labels : null;
}

/** The confidence under which the service marks an answer uncertain, or null. */
export function uncertainBelow() {
  return info && typeof info.uncertain_below === 'number' ? info.uncertain_below : null;
}
