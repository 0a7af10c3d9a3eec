// The page's controls: click to open / close / unfold, search, zoom and pan (uses graph_page.js).
"use strict";

function startPage() {
  const data = JSON.parse(document.getElementById("graph-data").textContent);
  const v = prepare(data), svg = document.getElementById("graph"), sceneEl = document.getElementById("scene");
  const $ = (id) => document.getElementById(id);
  let st = stateOf(data.initial), scene = layout(v, st), vb = null, hits = [];

  const setViewBox = (b) => { vb = b; svg.setAttribute("viewBox", `${b.x} ${b.y} ${b.w} ${b.h}`); };
  const aspect = () => svg.clientHeight / Math.max(svg.clientWidth, 1);
  const fit = (most) => { // the drawing's top, centred, never magnified, at most `most` times smaller
    const s = Math.min(Math.max(scene.width / svg.clientWidth, scene.height / svg.clientHeight, 1), most);
    const w = svg.clientWidth * s;
    setViewBox({x: (scene.width - w) / 2, y: 0, w, h: w * aspect()});
  };
  const toSvg = (e) => {
    const r = svg.getBoundingClientRect();
    return {x: vb.x + (e.clientX - r.left) * vb.w / r.width, y: vb.y + (e.clientY - r.top) * vb.h / r.height};
  };
  const zoom = (factor, at) => {
    const p = at || {x: vb.x + vb.w / 2, y: vb.y + vb.h / 2};
    setViewBox({x: p.x - (p.x - vb.x) * factor, y: p.y - (p.y - vb.y) * factor, w: vb.w * factor, h: vb.h * factor});
  };

  const showStatus = () => {
    const nodes = scene.leaves.filter((i) => i < v.n).length;
    $("status").textContent = `drawn: ${nodes} nodes, ${scene.leaves.length - nodes} boxes, ${scene.edges.size} edges` +
      ($("find").value.trim() ? `; ${hits.length} nodes match` : "");
  };
  const draw = (anchor, anchorAfter = anchor) => { // keep the anchor item's box where it is on screen
    const before = anchor !== undefined && scene.boxes.get(anchor);
    scene = layout(v, st);
    sceneEl.innerHTML = markup(v, scene);
    const after = anchorAfter !== undefined && scene.boxes.get(anchorAfter);
    if (before && after) setViewBox({...vb, x: vb.x + after[0] - before[0], y: vb.y + after[1] - before[1]});
    markHits();
    showStatus();
    $("fold").checked = v.runs.some((_, r) => !st.unfolded.has(r));
  };

  const shownAs = (i) => { // the drawn item holding node i
    const shown = shownItems(v, st, foldedRuns(v, st));
    return shown.has(v.groupOf[i]) ? shown.get(v.groupOf[i]) : i;
  };
  const element = (item) => sceneEl.querySelector(item < v.n ? `[data-n="${item}"]` :
    item < v.gr ? `[data-g="${item - v.n}"]` : `[data-r="${item - v.gr}"]`);
  const markHits = () => {
    const shown = shownItems(v, st, foldedRuns(v, st));
    for (const i of hits) {
      const item = shown.has(v.groupOf[i]) ? shown.get(v.groupOf[i]) : i;
      const el = element(item);
      if (el) el.classList.add("hit");
    }
  };
  const reveal = (i) => { // open every group around node i, unfold its run, and centre it
    for (const g of v.chains[v.groupOf[i]]) {
      st.expanded.add(g);
      v.runs.forEach((run, r) => { if (run.members.includes(g)) st.unfolded.add(r); });
    }
    draw();
    const [x, y] = scene.boxes.get(i);
    setViewBox({...vb, x: x + NODE_W / 2 - vb.w / 2, y: y + NODE_H / 2 - vb.h / 2});
    const el = element(i);
    el.classList.add("flash");
    setTimeout(() => el.classList.remove("flash"), 1500);
  };

  const find = () => {
    const q = $("find").value.trim().toLowerCase(), list = $("hits"), s = data.strings;
    hits = [];
    if (q) {
      data.nodes.forEach((node, i) => {
        if ([0, 2, 7, 8].some((k) => s[node[k]].toLowerCase().includes(q))) hits.push(i);
      });
    }
    list.innerHTML = hits.slice(0, 200).map((i) => {
      const node = data.nodes[i];
      return `<li data-n="${i}">${esc(s[node[0]])} · ${esc(s[node[3]])} · ${esc(v.groups[v.groupOf[i]].path || "(top level)")}</li>`;
    }).join("") + (hits.length > 200 ? `<li>… ${hits.length - 200} more</li>` : "");
    sceneEl.querySelectorAll(".hit").forEach((el) => el.classList.remove("hit"));
    markHits();
    showStatus();
  };
  let timer = null;
  $("find").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(find, 150); });
  $("find").addEventListener("keydown", (e) => { // Enter: go to the first hit
    if (e.key !== "Enter") return;
    clearTimeout(timer);
    find();
    if (hits.length) reveal(hits[0]);
  });
  $("hits").addEventListener("click", (e) => {
    const li = e.target.closest("li[data-n]");
    if (li) reveal(Number(li.dataset.n));
  });

  const click = (e) => {
    const el = e.target.closest("g.group");
    if (!el) return;
    if (el.dataset.r !== undefined) {
      const r = Number(el.dataset.r);
      st.unfolded.add(r);
      return draw(v.gr + r, v.n + v.runs[r].members[0]);
    }
    const g = Number(el.dataset.g), box = scene.boxes.get(v.n + g);
    if (!el.classList.contains("open")) { st.expanded.add(g); return draw(v.n + g); }
    if (toSvg(e).y - box[1] <= HEAD) { st.expanded.delete(g); draw(v.n + g); }
  };
  let drag = null;
  svg.addEventListener("pointerdown", (e) => { drag = {x: e.clientX, y: e.clientY, vb, moved: false}; });
  svg.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 4) return;
    if (!drag.moved) svg.setPointerCapture(e.pointerId);
    drag.moved = true;
    const k = drag.vb.w / svg.getBoundingClientRect().width;
    setViewBox({...drag.vb, x: drag.vb.x - dx * k, y: drag.vb.y - dy * k});
  });
  svg.addEventListener("pointerup", (e) => {
    const wasClick = drag && !drag.moved;
    drag = null;
    if (wasClick) click(e);
  });
  svg.addEventListener("wheel", (e) => { e.preventDefault(); zoom(Math.exp(e.deltaY * 0.0015), toSvg(e)); },
    {passive: false});
  $("zoom-in").onclick = () => zoom(1 / 1.25);
  $("zoom-out").onclick = () => zoom(1.25);
  $("fit").onclick = () => fit(Infinity);
  $("layers").onclick = () => { st = stateOf(data.layers); draw(); fit(1); };
  $("all").onclick = () => {
    st = {expanded: new Set(v.groups.map((_, g) => g)), unfolded: new Set(v.runs.map((_, r) => r))};
    draw(); fit(1);
  };
  $("fold").onchange = () => {
    st.unfolded = $("fold").checked ? new Set() : new Set(v.runs.map((_, r) => r));
    draw(); fit(1);
  };
  $("fold").checked = v.runs.some((_, r) => !st.unfolded.has(r));
  $("fold").disabled = v.runs.length === 0;
  fit(1);
}

if (typeof document !== "undefined") document.addEventListener("DOMContentLoaded", startPage);
