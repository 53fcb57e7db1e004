/* Bar charts, half-circle gauges and the one-line agreement reading. */
import { colourOf, el, pct, svgEl, topOf } from './format.js';

// One-line agreement reading: mean of the two MEM match probabilities (documented in docs/web.md).
export const AGREE_AT = 0.6;
export const DISAGREE_BELOW = 0.4;

export function barChart(list, probabilities, { small = false } = {}) {
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

/** The plain-language reading of one alignment object; `missing` says why there is none. */
export function agreement(alignment, missing) {
  if (!alignment) return { cls: 'unknown', text: missing };
  const match = (alignment.audio + alignment.video) / 2;
  if (match >= AGREE_AT) return { cls: 'agree', text: `Voice and face agree (${pct(match)} match).` };
  if (match < DISAGREE_BELOW) return { cls: 'disagree', text: `Voice and face disagree (${pct(match)} match).` };
  return { cls: 'partly', text: `Voice and face partly agree (${pct(match)} match).` };
}

export function bandColour(value, goodAt, badBelow) {
  if (value >= goodAt) return '#047857';
  if (value < badBelow) return '#b91c1c';
  return '#b45309';
}

/** A half-circle SVG gauge; `fraction` in [0, 1] sets the fill. */
export function gauge({ name, title, note, fraction, valueText, min, max, colour, ariaValue, ariaMin, ariaMax }) {
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
