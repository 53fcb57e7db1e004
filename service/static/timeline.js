/* The timeline of model windows beside the player. Blocks can arrive one at a time while the
   answer streams (`addSegment`), or all at once with the summary (`setTimeline`). */
import { agreement, barChart } from './charts.js';
import { $, capital, colourOf, el, pct, seconds, verdict, verdictText } from './format.js';

const DENSE_ABOVE = 24; // windows; beyond it blocks lose their text and the detail panel reads them
const NO_COMPARISON = 'Voice and face cannot be compared in this window (one of them is missing).';

const state = {
  segments: [],
  total: null, // clip seconds the timeline spans; null: not known yet (the last window's end)
  pointed: null, // window index under the pointer
  focused: null, // window index with keyboard focus
  labels: [], // legend order
  mediaUrl: null, // object URL of the clip in the player
};

/** Put `file` in the player (its duration may then be known before the answer is). */
export function loadClip(file) {
  const player = $('player');
  if (state.mediaUrl) URL.revokeObjectURL(state.mediaUrl);
  state.mediaUrl = URL.createObjectURL(file);
  $('player-note').hidden = true;
  player.src = state.mediaUrl;
}

/** The clip's length from the player, or null (not loaded yet, or a live-recorded WebM). */
export function clipDuration() {
  const d = $('player').duration;
  return Number.isFinite(d) && d > 0 ? d : null;
}

/** An empty timeline spanning `total` seconds (null: grow with the windows), legend in `labels` order. */
export function resetTimeline(total, labels) {
  Object.assign(state, { segments: [], total, pointed: null, focused: null, labels: labels || [] });
  $('segments').replaceChildren();
  $('segment-detail').replaceChildren();
  layout();
}

export function addSegment(seg) {
  const i = state.segments.length;
  state.segments.push(seg);
  $('segments').append(block(seg, i));
  layout();
  if (i === 0) updateCurrent($('player').currentTime || 0);
}

export function setTimeline(segments, total, labels) {
  resetTimeline(total, labels);
  segments.forEach(addSegment);
}

/** Called when the clip's length becomes known after the first windows were drawn. */
export function setTotal(total) {
  state.total = total;
  layout();
}

export const segmentCount = () => state.segments.length;

function block(seg, i) {
  const button = el('button', 'segment');
  button.type = 'button';
  button.dataset.index = String(i);
  button.tabIndex = i === 0 ? 0 : -1;
  if (seg.emotion) {
    const v = verdict(seg);
    button.textContent = v.unsure ? `Maybe ${seg.emotion}` : capital(seg.emotion);
    button.classList.toggle('unsure', v.unsure);
    button.style.setProperty('--c', colourOf(seg.emotion));
    button.setAttribute('aria-label', `${seconds(seg.start)} to ${seconds(seg.end)}: ${verdictText(v)}`);
  } else {
    button.textContent = 'No data';
    button.classList.add('empty');
    button.setAttribute('aria-label', `${seconds(seg.start)} to ${seconds(seg.end)}: no voice or face`);
  }
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
  return button;
}

function span() {
  const { segments, total } = state;
  const last = segments.length ? segments[segments.length - 1].end : 0;
  return Math.max(total || 0, last) || 1;
}

/** Block positions, the legend and the axis for the current span. */
function layout() {
  const { segments } = state;
  const total = span();
  $('timeline').classList.toggle('dense', segments.length > DENSE_ABOVE);
  $('segments').querySelectorAll('.segment').forEach((button, i) => {
    const seg = segments[i];
    // Windows may overlap; draw each up to where the next one starts so every block stays visible.
    const shownEnd = i + 1 < segments.length ? Math.min(seg.end, segments[i + 1].start) : seg.end;
    button.style.left = `${(100 * seg.start) / total}%`;
    button.style.width = `${(100 * Math.max(shownEnd - seg.start, 0.05)) / total}%`;
  });
  const legend = $('legend');
  legend.replaceChildren();
  const seen = new Set(segments.map((seg) => seg.emotion).filter(Boolean));
  const order = [...state.labels.filter((l) => seen.has(l)), ...[...seen].filter((l) => !state.labels.includes(l))];
  for (const label of order) {
    const item = el('li', null, label);
    item.style.setProperty('--c', colourOf(label));
    legend.append(item);
  }
  if ($('segments').querySelector('.unsure')) legend.append(el('li', 'legend-unsure', 'Maybe …: the model is not sure'));
  const axis = $('timeline-axis');
  axis.replaceChildren();
  for (const t of axisTicks(total)) {
    const tick = el('span', null, t < 60 ? `${t} s` : seconds(t));
    tick.style.left = `${(100 * t) / total}%`;
    if (t > 0.92 * total) tick.classList.add('end');
    axis.append(tick);
  }
  $('playhead').style.left = `${Math.min(100, (100 * ($('player').currentTime || 0)) / total)}%`;
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
  if (next) next.focus();
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
  const v = verdict(seg);
  const line = el('p', 'segment-top');
  if (v.unsure) {
    line.append(el('strong', 'unsure-badge', 'Not sure'), document.createTextNode(' — maybe '));
  } else {
    line.append(document.createTextNode('Most likely '));
  }
  line.append(el('strong', null, seg.emotion));
  if (v.confidence !== null) line.append(document.createTextNode(` (${pct(v.confidence)})`));
  const reading = agreement(seg.alignment, NO_COMPARISON);
  const list = el('ul', 'bars');
  list.setAttribute('aria-label', `Window ${i + 1} probabilities`);
  box.append(line, el('p', `reading ${reading.cls}`, reading.text), barChart(list, seg.probabilities, { small: true }));
}

function updateCurrent(t) {
  const i = segmentAt(t);
  document.querySelectorAll('.segment').forEach((b) => {
    const on = Number(b.dataset.index) === i;
    b.classList.toggle('current', on);
    if (on) b.setAttribute('aria-current', 'true');
    else b.removeAttribute('aria-current');
  });
  $('playhead').style.left = `${Math.min(100, (100 * t) / span())}%`;
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

export function wirePlayer() {
  const player = $('player');
  player.addEventListener('timeupdate', () => updateCurrent(player.currentTime));
  player.addEventListener('seeked', () => updateCurrent(player.currentTime));
  player.addEventListener('error', () => {
    if (player.getAttribute('src')) $('player-note').hidden = false;
  });
}
