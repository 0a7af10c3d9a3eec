// The script of a `graphllm inspect --render` page: redraws the graph when a group is opened or closed
// or a run of identical layers is unfolded; search, zoom and pan. No network, no other files.
// layout() and markup() are graphllm/graph_layout.py:layout and graphllm/graph_render.py:svg_markup
// step for step (tests/test_inspect.py runs this file under node and compares the markup).
"use strict";

const NODE_W = 170, NODE_H = 34, GAP_X = 20, GAP_Y = 36, MARGIN = 20, PAD = 10, HEAD = 24;
const NF = 9; // graph_render.NODE_FIELDS: a node row's string fields come first, then its group
const TITLE_KEYS = [["name", 0], ["op", 1], ["target", 2], ["shape", 4], ["dtype", 5], ["pass", 6],
  ["module", 7], ["source", 8]];

function prepare(data) {
  const groups = data.groups.map(([path, label, parent, key, size, made]) =>
    ({path, label, parent, key, size, made, nodes: [], children: []}));
  groups.forEach((g, i) => { if (g.parent >= 0) groups[g.parent].children.push(i); });
  data.nodes.forEach((node, i) => groups[node[NF]].nodes.push(i));
  const chains = groups.map((_, g) => {
    const c = [];
    for (let h = g; h >= 0; h = groups[h].parent) c.push(h);
    return c.reverse();
  });
  const source = data.nodes.map((node) => ["placeholder", "get_attr"].includes(data.strings[node[1]]));
  const runs = data.runs.map(([parent, members, label]) => ({parent, members, label}));
  const n = data.nodes.length;
  return {data, n, gr: n + groups.length, groups, chains, source, runs, inputs: data.inputs,
    groupOf: data.nodes.map((node) => node[NF])};
}

function stateOf(s) { return {expanded: new Set(s.expanded), unfolded: new Set(s.unfolded)}; }

function foldedRuns(v, st) {
  const f = new Map();
  v.runs.forEach((run, r) => { if (!st.unfolded.has(r)) run.members.forEach((m) => f.set(m, r)); });
  return f;
}

function itemKey(v, item) {
  if (item < v.n) return item;
  if (item < v.gr) return v.groups[item - v.n].key;
  return Math.min(...v.runs[item - v.gr].members.map((m) => v.groups[m].key));
}

function items(v, g, f) {
  const out = new Set(v.groups[g].nodes);
  for (const c of v.groups[g].children) out.add(f.has(c) ? v.gr + f.get(c) : v.n + c);
  return [...out].sort((a, b) => itemKey(v, a) - itemKey(v, b));
}

function siblingEdges(v, f) {
  const out = new Map();
  const item = (node, chain, depth) => {
    if (depth === chain.length) return node;
    const h = chain[depth];
    return f.has(h) ? v.gr + f.get(h) : v.n + h;
  };
  v.inputs.forEach((ins, node) => {
    const cv = v.chains[v.groupOf[node]];
    for (const u of ins) {
      const cu = v.chains[v.groupOf[u]];
      let k = 0;
      while (k < cu.length && k < cv.length && cu[k] === cv[k]) k++;
      const a = item(u, cu, k), b = item(node, cv, k);
      if (a !== b) {
        if (!out.has(cu[k - 1])) out.set(cu[k - 1], []);
        out.get(cu[k - 1]).push([a, b]);
      }
    }
  });
  return out;
}

function rowsOf(v, list, edges) {
  const preds = new Map(), readers = new Map(), rank = new Map();
  const isSource = (i) => i < v.n && v.source[i];
  for (const [a, b] of edges) {
    if (!preds.has(b)) preds.set(b, []);
    preds.get(b).push(a);
    if (!readers.has(a)) readers.set(a, []);
    readers.get(a).push(b);
  }
  for (const b of list) {
    if (isSource(b)) continue;
    let r = 0;
    for (const a of preds.get(b) || []) if (rank.has(a)) r = Math.max(r, rank.get(a));
    rank.set(b, 1 + r);
  }
  for (const s of list.filter(isSource)) {
    let first = Infinity;
    for (const b of readers.get(s) || []) if (rank.has(b)) first = Math.min(first, rank.get(b));
    rank.set(s, Math.max(0, (first === Infinity ? 1 : first) - 1));
  }
  const levels = [...new Set(rank.values())].sort((a, b) => a - b);
  const rowOf = new Map(levels.map((r, k) => [r, k]));
  const rows = levels.map(() => []);
  for (const i of list) rows[rowOf.get(rank.get(i))].push(i);
  return rows;
}

function layout(v, st) {
  const f = foldedRuns(v, st), between = siblingEdges(v, f), n = v.n;
  const scene = {boxes: new Map(), frames: [], leaves: [], edges: new Map(), width: 0, height: 0};
  const sizes = new Map(), rowsAt = new Map();
  const size = (item) => {
    const g = item - n;
    if (item < n || g >= v.groups.length || !st.expanded.has(g)) return [NODE_W, NODE_H];
    const rows = rowsOf(v, items(v, g, f), between.get(g) || []);
    rowsAt.set(item, rows);
    const dims = rows.map((row) => row.map((i) => { if (!sizes.has(i)) sizes.set(i, size(i)); return sizes.get(i); }));
    let innerW = 0, innerH = GAP_Y * Math.max(dims.length - 1, 0);
    for (const d of dims) {
      innerW = Math.max(innerW, d.reduce((s, [w]) => s + w, 0) + GAP_X * (d.length - 1));
      innerH += Math.max(...d.map(([, h]) => h));
    }
    if (g === 0) return [innerW + 2 * MARGIN, innerH + 2 * MARGIN];
    return [Math.max(innerW, NODE_W) + 2 * PAD, HEAD + innerH + PAD];
  };
  const place = (item, x, y) => {
    const [w, h] = sizes.get(item);
    scene.boxes.set(item, [x, y, w, h]);
    if (!rowsAt.has(item)) { scene.leaves.push(item); return; }
    if (item !== n) scene.frames.push(item);
    let [ox, oy, innerW] = item === n ? [x + MARGIN, y + MARGIN, w - 2 * MARGIN] : [x + PAD, y + HEAD, w - 2 * PAD];
    for (const row of rowsAt.get(item)) {
      const rowW = row.reduce((s, i) => s + sizes.get(i)[0], 0) + GAP_X * (row.length - 1);
      let rx = ox + Math.floor((innerW - rowW) / 2);
      for (const i of row) { place(i, rx, oy); rx += sizes.get(i)[0] + GAP_X; }
      oy += Math.max(...row.map((i) => sizes.get(i)[1])) + GAP_Y;
    }
  };
  sizes.set(n, size(n));
  place(n, 0, 0);
  [scene.width, scene.height] = sizes.get(n);
  scene.leaves.sort((a, b) => itemKey(v, a) - itemKey(v, b));
  const shown = shownItems(v, st, f);
  v.inputs.forEach((ins, node) => {
    const b = shown.has(v.groupOf[node]) ? shown.get(v.groupOf[node]) : node;
    for (const u of ins) {
      const a = shown.has(v.groupOf[u]) ? shown.get(v.groupOf[u]) : u;
      if (a !== b) scene.edges.set(a + "," + b, (scene.edges.get(a + "," + b) || 0) + 1);
    }
  });
  return scene;
}

function shownItems(v, st, f) { // group -> the closed group or folded run it is drawn inside
  const shown = new Map();
  v.groups.forEach((_, g) => {
    for (const h of v.chains[g].slice(1)) {
      if (f.has(h)) { shown.set(g, v.gr + f.get(h)); break; }
      if (!st.expanded.has(h)) { shown.set(g, v.n + h); break; }
    }
  });
  return shown;
}

function esc(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#x27;");
}

function nodeMarkup(v, i, [x, y]) {
  const node = v.data.nodes[i], st = v.data.strings;
  const name = st[node[0]], fill = st[node[NF + 1]], ink = st[node[NF + 2]];
  const title = TITLE_KEYS.filter(([, k]) => st[node[k]]).map(([key, k]) => `${key}: ${st[node[k]]}`).join("\n");
  return `<g class="${node[NF + 3] ? "node created" : "node"}" id="n-${esc(name)}" data-n="${i}"><title>${esc(title)}</title>` +
    `<rect x="${x}" y="${y}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="${fill}"/>` +
    `<text x="${x + 6}" y="${y + 14}" fill="${ink}">${esc(name.slice(0, 26))}</text>` +
    `<text x="${x + 6}" y="${y + 28}" fill="${ink}" class="t">${esc(st[node[3]])}</text></g>`;
}

function groupMarkup(v, g, [x, y, w, h], open) {
  const {path, label, size, made} = v.groups[g];
  const cls = (open ? "group open" : "group") + (made ? " created" : "");
  const hint = open ? "click its title to close" : "click to open";
  const head = open ? `<text class="head" x="${x + 8}" y="${y + 16}">${esc(label)} · ${size} nodes</text>` :
    `<text x="${x + 6}" y="${y + 14}">${esc(label.slice(0, 26))}</text>` +
    `<text x="${x + 6}" y="${y + 28}" class="t">${size} nodes</text>`;
  return `<g class="${cls}" data-g="${g}"><title>${esc(path || "graph")}\n${size} nodes · ${hint}</title>` +
    `<rect x="${x}" y="${y}" width="${w}" height="${h}" rx="${open ? 8 : 5}"/>${head}</g>`;
}

function runMarkup(v, r, [x, y, w, h]) {
  const {members, label} = v.runs[r];
  const each = v.groups[members[0]].size, made = members.some((m) => v.groups[m].made);
  return `<g class="group run${made ? " created" : ""}" data-r="${r}"><title>${members.length} identical layers: ` +
    `${esc(v.groups[members[0]].path)} … ${esc(v.groups[members[members.length - 1]].path)}\n${each} nodes each · ` +
    `click to show them one by one</title>` +
    `<rect class="stack" x="${x + 4}" y="${y - 4}" width="${w}" height="${h}" rx="5"/>` +
    `<rect x="${x}" y="${y}" width="${w}" height="${h}" rx="5"/>` +
    `<text x="${x + 6}" y="${y + 14}">${esc(label.slice(0, 20))}</text>` +
    `<text x="${x + 6}" y="${y + 28}" class="t">${each} nodes each</text>` +
    `<text class="badge" x="${x + w - 6}" y="${y + 14}">×${members.length}</text></g>`;
}

function edgeMarkup(a, b, count, returned) {
  const sx = a[0] + Math.floor(a[2] / 2), sy = a[1] + a[3], ex = b[0] + Math.floor(b[2] / 2), ey = b[1];
  const mid = Math.floor((sy + ey) / 2);
  const d = `d="M${sx},${sy} C${sx},${mid} ${ex},${mid} ${ex},${ey}" marker-end="url(#arrow)"`;
  if (count === 1) return `<path class="edge${returned ? " ret" : ""}" ${d}/>`;
  if (returned) return `<path class="edge ret" data-k="${count}" ${d}><title>${count} edges</title></path>`;
  return `<path class="edge" data-k="${count}" style="stroke-width:${1 + Math.min(3, 31 - Math.clz32(count))}" ${d}>` +
    `<title>${count} edges</title></path>`;
}

function markup(v, scene) {
  const out = scene.frames.map((f) => groupMarkup(v, f - v.n, scene.boxes.get(f), true));
  for (const [ab, k] of scene.edges) {
    const [a, b] = ab.split(",").map(Number);
    const returned = b < v.n && v.data.strings[v.data.nodes[b][1]] === "output";
    out.push(edgeMarkup(scene.boxes.get(a), scene.boxes.get(b), k, returned));
  }
  for (const i of scene.leaves) {
    const box = scene.boxes.get(i);
    out.push(i < v.n ? nodeMarkup(v, i, box) : i < v.gr ? groupMarkup(v, i - v.n, box, false) : runMarkup(v, i - v.gr, box));
  }
  return out.join("\n");
}

if (typeof module !== "undefined") module.exports = {prepare, stateOf, layout, markup};
