/* The result: the winning emotion (or "not sure"), the charts, each sense, the gauges, the facts. */
import { AGREE_AT, DISAGREE_BELOW, agreement, bandColour, barChart, gauge } from './charts.js';
import { $, colourOf, el, pct, providerName, seconds, topOf, verdict, verdictText } from './format.js';
import { uncertainBelow } from './info.js';
import { setStatus } from './status.js';
import { setTimeline } from './timeline.js';

// AVEL cosine similarity colour bands, same as the help text.
const SIMILARITY_CLOSE_AT = 0.5;
const SIMILARITY_FAR_BELOW = 0.2;

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
  head.append(el('strong', null, top[0]), document.createTextNode(` (${pct(top[1])})`));
  box.append(head);
  if (kind === 'video') {
    box.append(el('p', 'hint', `Face found in ${view.frames_with_face} of ${view.frames} frames.`));
  }
  const list = el('ul', 'bars');
  list.setAttribute('aria-label', `${kind === 'audio' ? 'Voice' : 'Face'} probabilities`);
  box.append(barChart(list, view.probabilities, { small: true }));
}

function renderAlignment(alignment, modalities) {
  const what = missingReason('audio', modalities && modalities.audio) ? 'there is no voice' : 'there is no face';
  const reading = agreement(alignment, `Cannot compare voice and face: ${what} to compare with.`);
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

function renderWinner(result) {
  const v = verdict(result);
  $('winner-label').textContent = result.emotion;
  $('winner').style.setProperty('--c', colourOf(result.emotion));
  $('winner').classList.toggle('unsure', v.unsure);
  $('winner-caption').textContent = v.unsure ? 'The model is not sure what the clip shows' : 'The clip most likely shows';
  $('winner-unsure').hidden = !v.unsure;
  const audioMissing = missingReason('audio', result.modalities && result.modalities.audio);
  const videoMissing = missingReason('video', result.modalities && result.modalities.video);
  const source = audioMissing ? 'from the face alone' : videoMissing ? 'from the voice alone' : 'from voice and face';
  const likely = v.confidence === null ? '' : `${pct(v.confidence)} likely, `;
  let detail = `${likely}${source}, over ${seconds(result.duration_s || 0)}.`;
  const threshold = uncertainBelow();
  if (v.unsure && threshold !== null) detail += ` Under ${pct(threshold)} the answer is a guess.`;
  $('winner-detail').textContent = detail;
}

function renderFacts(result) {
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
}

/** While the answer streams in: only the timeline (and the player) are shown. */
export function showPartial() {
  $('result').classList.add('partial');
  $('result').hidden = false;
}

export function hideResult() {
  $('result').hidden = true;
}

export function render(result) {
  renderWinner(result);
  barChart($('fused-chart'), result.probabilities);
  renderModality('audio', result.modalities && result.modalities.audio);
  renderModality('video', result.modalities && result.modalities.video);
  renderAlignment(result.alignment, result.modalities);
  setTimeline(result.segments || [], result.duration_s || null, Object.keys(result.probabilities || {}));
  renderFacts(result);

  $('result').classList.remove('partial');
  $('result').hidden = false;
  setStatus(`Done: ${verdictText(verdict(result))}.`);
  $('result-heading').focus({ preventScroll: true });
  $('result').scrollIntoView({ block: 'start' });
}
