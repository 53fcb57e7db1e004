/* DOM helpers and the words and numbers the page shows. */

const EMOTION_COLOURS = ['neutral', 'happy', 'sad', 'angry', 'fearful', 'disgust', 'surprised'];

export const $ = (id) => document.getElementById(id);

export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
export function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export const capital = (label) => label.charAt(0).toUpperCase() + label.slice(1);
export const pct = (p) => `${Math.round(p * 100)}%`;
export const NBSP = '\u00a0'; // keeps a number on the same line as its unit

export function seconds(s) {
  if (s < 60) return `${s.toFixed(1)}${NBSP}s`;
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, '0')}`;
}

export function bytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}${NBSP}GB`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}${NBSP}MB`;
  return `${Math.max(1, Math.round(n / 1e3))}${NBSP}kB`;
}

export function durationWords(s) {
  if (s >= 120 && s % 60 === 0) return `${s / 60}${NBSP}minutes`;
  return `${Math.round(s)}${NBSP}seconds`;
}

export function colourOf(label) {
  return EMOTION_COLOURS.includes(label) ? `var(--e-${label})` : 'var(--e-other)';
}

export function topOf(probabilities) {
  let best = null;
  for (const [label, p] of Object.entries(probabilities || {})) {
    if (best === null || p > best[1]) best = [label, p];
  }
  return best;
}

/** 'CUDAExecutionProvider' -> 'CUDA (GPU)', 'CPUExecutionProvider' -> 'CPU'. */
export function providerName(provider) {
  const short = provider.replace(/ExecutionProvider$/, '');
  return short === 'CPU' ? 'CPU' : `${short} (GPU)`;
}

/** The answer's label with how sure the model is, for a Prediction or a Segment.
    `confidence` and `uncertain` are newer fields: without them the top probability is the
    confidence and the answer is not marked unsure. */
export function verdict(answer) {
  const top = topOf(answer.probabilities);
  const confidence = typeof answer.confidence === 'number' ? answer.confidence : top ? top[1] : null;
  return { label: answer.emotion, confidence, unsure: answer.uncertain === true };
}

/** 'happy (71%)' or, when the model is not sure, 'not sure — maybe happy (41%)'. */
export function verdictText({ label, confidence, unsure }) {
  const share = confidence === null ? '' : ` (${pct(confidence)})`;
  return `${unsure ? 'not sure — maybe ' : ''}${label}${share}`;
}
