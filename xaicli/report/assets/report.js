/* xai report: gallery, metrics, analysis and provenance of a run, drawn from window.XAI.
   Text from the data (paths, names) is only ever set with textContent or setAttribute. */
(function () {
  "use strict";
  var X = window.XAI || {};
  var R = X.report || {}, I = X.items || {names: []}, META = R.meta || {}, EV = R.evaluation, AN = R.analysis;
  var N = I.names.length, METHODS = META.methods || [], PAGE = 48, SCORE_PAGE = 50;
  var SVGNS = "http://www.w3.org/2000/svg";
  var COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
  var state = {shown: METHODS.map(function (_, i) { return i; }), cmap: META.colormap || "bwr", overlay: false, alpha: 0.6,
               cls: "all", correct: "all", query: "", members: null, page: 0};
  var sheets = {};  // url -> {ready, failed, waiting: [elements]}

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs) {
    var node = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : String(+v.toPrecision(4));
  }
  function className(c) {
    if (c === null || c === undefined || c < 0) return "?";
    return META.labels && META.labels[c] !== undefined ? c + " " + META.labels[c] : String(c);
  }

  // -- thumbnails: tiles of sprite sheets, heatmaps coloured by an SVG filter per colormap --------
  function sheet(url, node) {
    var entry = sheets[url];
    if (!entry) {
      entry = sheets[url] = {ready: false, failed: false, waiting: []};
      var img = new Image();
      img.onload = function () { entry.ready = true; entry.waiting.forEach(function (n) { n.classList.add("ready"); }); entry.waiting = []; };
      img.onerror = function () { entry.failed = true; console.error("xai report: missing thumbnail sheet " + url); };
      img.src = url;
    }
    if (entry.ready) node.classList.add("ready"); else entry.waiting.push(node);
  }
  function place(layer, url, item) {
    var tile = parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--tile")) || 96;
    var slot = item % META.perSheet, col = slot % META.columns, row = Math.floor(slot / META.columns);
    layer.style.backgroundImage = 'url("' + url + '")';
    layer.style.backgroundSize = (META.columns * tile) + "px auto";
    layer.style.backgroundPosition = (-col * tile) + "px " + (-row * tile) + "px";
  }
  function heatUrl(method, item) { return "thumbs/heat/" + method + "/" + Math.floor(item / META.perSheet) + ".png"; }
  function thumb(item, method) {
    var box = el("div", {"class": "thumb", "data-item": item, "data-method": method});
    var wanted = [];
    if (state.overlay && I.inputs[item]) {
      var under = el("div", {"class": "layer input"});
      var inputUrl = "thumbs/input/" + Math.floor(item / META.perSheet) + ".jpg";
      place(under, inputUrl, item); box.appendChild(under); wanted.push(inputUrl);
    }
    var heat = el("div", {"class": "layer heat"});
    place(heat, heatUrl(method, item), item);
    heat.style.filter = "url(#cm-" + state.cmap + ")";
    if (state.overlay && I.inputs[item]) heat.style.opacity = state.alpha;
    box.appendChild(heat); wanted.push(heatUrl(method, item));
    box.setAttribute("data-src", wanted.join(" "));
    var pending = wanted.length, proxy = {classList: {add: function () { if (--pending === 0) box.classList.add("ready"); }}};
    wanted.forEach(function (url) { sheet(url, proxy); });
    return box;
  }

  // -- gallery ------------------------------------------------------------------------------------
  function correctOf(i) {
    if (I.predicted[i] < 0 || I.target[i] < 0) return null;
    return I.predicted[i] === I.target[i];
  }
  function visible() {
    var q = state.query.toLowerCase(), out = [];
    for (var i = 0; i < N; i++) {
      if (state.members && !state.members.set[i]) continue;
      if (!state.shown.some(function (m) { return I.present[m][i]; }) && METHODS.length) continue;
      if (state.cls !== "all" && I.target[i] !== +state.cls) continue;
      if (state.correct !== "all") { var c = correctOf(i); if (c === null || c !== (state.correct === "correct")) continue; }
      if (q && I.names[i].toLowerCase().indexOf(q) < 0) continue;
      out.push(i);
    }
    return out;
  }
  function renderGallery() {
    var items = visible(), pages = Math.max(1, Math.ceil(items.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    document.getElementById("count").textContent = items.length + " of " + N + " inputs";
    document.getElementById("page").textContent = "page " + (state.page + 1) + " / " + pages;
    var cards = document.getElementById("cards");
    cards.textContent = "";
    items.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (i) {
      var card = el("div", {"class": "card", "data-item": i});
      card.appendChild(el("div", {"class": "name", title: I.names[i]}, I.names[i]));
      var meta = el("div", {"class": "meta"}, "target " + className(I.target[i]));
      var c = correctOf(i);
      if (c !== null) meta.appendChild(el("span", c ? {} : {"class": "wrong"}, c ? " · predicted ✓" : " · predicted " + className(I.predicted[i])));
      card.appendChild(meta);
      var tiles = el("div", {"class": "tiles"});
      state.shown.forEach(function (m) {
        var fig = el("figure", {"class": "tile" + (I.present[m][i] ? "" : " missing"), "data-method": METHODS[m]});
        if (I.present[m][i]) fig.appendChild(thumb(i, m)); else fig.appendChild(el("div", {"class": "thumb ready"}));
        var p = I.prob[m][i];
        fig.appendChild(el("figcaption", null, METHODS[m] + (p !== null && p !== undefined ? " · p=" + fmt(p) : "")));
        tiles.appendChild(fig);
      });
      card.appendChild(tiles);
      cards.appendChild(card);
    });
  }
  function setupGallery() {
    var boxes = document.getElementById("method-boxes");
    METHODS.forEach(function (name, m) {
      var label = el("label"), box = el("input", {type: "checkbox", value: m, "class": "method"});
      box.checked = true;
      box.addEventListener("change", function () {
        state.shown = Array.prototype.filter.call(boxes.querySelectorAll("input"), function (b) { return b.checked; })
          .map(function (b) { return +b.value; });
        state.page = 0; renderGallery();
      });
      label.appendChild(box); label.appendChild(document.createTextNode(" " + name)); boxes.appendChild(label);
    });
    var cm = document.getElementById("colormap");
    (META.colormaps || []).forEach(function (name) { cm.appendChild(el("option", {value: name}, name)); });
    cm.value = state.cmap;
    cm.addEventListener("change", function () { state.cmap = cm.value; renderGallery(); });
    var overlay = document.getElementById("overlay");
    overlay.disabled = !I.inputs.some(function (v) { return v; });
    overlay.addEventListener("change", function () { state.overlay = overlay.checked; renderGallery(); });
    var alpha = document.getElementById("alpha");
    alpha.addEventListener("input", function () { state.alpha = +alpha.value; renderGallery(); });
    var classes = {}, cls = document.getElementById("class-filter");
    I.target.forEach(function (t) { if (t >= 0) classes[t] = true; });
    Object.keys(classes).map(Number).sort(function (a, b) { return a - b; })
      .forEach(function (t) { cls.appendChild(el("option", {value: t}, className(t))); });
    cls.addEventListener("change", function () { state.cls = cls.value; state.page = 0; renderGallery(); });
    var correct = document.getElementById("correct-filter");
    correct.disabled = !I.predicted.some(function (p) { return p >= 0; });
    correct.addEventListener("change", function () { state.correct = correct.value; state.page = 0; renderGallery(); });
    var search = document.getElementById("search");
    search.addEventListener("input", function () { state.query = search.value; state.page = 0; renderGallery(); });
    document.getElementById("prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); renderGallery(); });
    document.getElementById("next").addEventListener("click", function () { state.page += 1; renderGallery(); });
    document.getElementById("cluster-clear").addEventListener("click", function () { filterMembers(null); });
  }
  function filterMembers(members) {
    state.members = members; state.page = 0;
    if (members) {  // a cluster shows exactly its members: the other filters step aside
      state.cls = "all"; state.correct = "all"; state.query = "";
      document.getElementById("class-filter").value = "all";
      document.getElementById("correct-filter").value = "all";
      document.getElementById("search").value = "";
      if (members.method >= 0 && state.shown.indexOf(members.method) < 0) {
        state.shown.push(members.method); state.shown.sort();
        Array.prototype.forEach.call(document.querySelectorAll("#method-boxes input"), function (b) { if (+b.value === members.method) b.checked = true; });
      }
    }
    var chip = document.getElementById("cluster-filter");
    chip.hidden = !members;
    document.getElementById("cluster-label").textContent = members ? members.label : "";
    showTab("gallery"); renderGallery();
  }

  // -- plots --------------------------------------------------------------------------------------
  function plot(width, height, xs, ys, opts) {
    var pad = {l: 44, r: 10, t: 18, b: 28}, s = svg("svg", {"class": "plot", width: width, height: height, viewBox: "0 0 " + width + " " + height});
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (opts && opts.zeroY) y0 = Math.min(0, y0);
    if (x1 === x0) x1 = x0 + 1; if (y1 === y0) y1 = y0 + 1;
    var fx = function (v) { return pad.l + (v - x0) / (x1 - x0) * (width - pad.l - pad.r); };
    var fy = function (v) { return height - pad.b - (v - y0) / (y1 - y0) * (height - pad.t - pad.b); };
    s.appendChild(svg("line", {"class": "axis", x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b}));
    s.appendChild(svg("line", {"class": "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b}));
    [[y0, fy(y0)], [y1, fy(y1)]].forEach(function (t) { var n = svg("text", {x: 2, y: t[1] + 3}); n.textContent = fmt(t[0]); s.appendChild(n); });
    [[x0, fx(x0)], [x1, fx(x1)]].forEach(function (t) { var n = svg("text", {x: t[1] - 6, y: height - 10}); n.textContent = fmt(t[0]); s.appendChild(n); });
    if (opts && opts.title) { var t = svg("text", {x: pad.l, y: 12}); t.textContent = opts.title; s.appendChild(t); }
    return {svg: s, x: fx, y: fy};
  }

  // -- metrics ------------------------------------------------------------------------------------
  function renderMetrics() {
    var root = document.getElementById("metrics");
    if (!EV) { root.appendChild(el("p", {"class": "note"}, "No evaluation: run `xai evaluate` and pass its folder with --evaluation.")); return; }
    root.appendChild(el("h2", null, "Summary"));
    root.appendChild(el("p", {"class": "note"}, "from " + EV.folder));
    var t = el("table", {id: "summary"}), head = el("tr");
    ["metric", "rank", "method", "mean", "std", "median", "n", "NaN"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    t.appendChild(head);
    EV.summary.forEach(function (entry) {
      var order = entry.ranking.concat(Object.keys(entry.methods).filter(function (m) { return entry.ranking.indexOf(m) < 0; }));
      var dir = entry.higherIsBetter === true ? " (higher is better)" : entry.higherIsBetter === false ? " (lower is better)" : "";
      order.forEach(function (method, k) {
        var s = entry.methods[method], tr = el("tr");
        tr.appendChild(el("td", null, k === 0 ? entry.key + dir : ""));
        tr.appendChild(el("td", {"class": "num"}, s.rank || "–"));
        tr.appendChild(el("td", null, method));
        ["mean", "std", "median", "n", "n_nan"].forEach(function (key) { tr.appendChild(el("td", {"class": "num"}, fmt(s[key]))); });
        t.appendChild(tr);
      });
    });
    root.appendChild(t);
    var curves = Object.keys(EV.curves || {});
    if (curves.length) {
      root.appendChild(el("h2", null, "Curves (mean over inputs)"));
      var box = el("div", {"class": "plots"});
      curves.forEach(function (metric) { box.appendChild(curvePlot(metric, EV.curves[metric])); });
      root.appendChild(box);
    }
    root.appendChild(el("h2", null, "Scores per input"));
    root.appendChild(scoreTable());
  }
  function curvePlot(metric, perMethod) {
    var methods = Object.keys(perMethod), xs = [], ys = [];
    methods.forEach(function (m) { perMethod[m].forEach(function (v, k) { if (v !== null) { xs.push(k / Math.max(1, perMethod[m].length - 1)); ys.push(v); } }); });
    var p = plot(360, 220, xs.length ? xs : [0, 1], ys.length ? ys : [0, 1], {title: metric + " — fraction removed →", zeroY: true});
    p.svg.setAttribute("data-metric", metric);
    methods.forEach(function (m, j) {
      var c = perMethod[m], pts = [];
      c.forEach(function (v, k) { if (v !== null) pts.push(p.x(k / Math.max(1, c.length - 1)) + "," + p.y(v)); });
      p.svg.appendChild(svg("polyline", {points: pts.join(" "), fill: "none", stroke: COLOURS[j % COLOURS.length], "stroke-width": 1.6, "class": "curve"}));
      var label = svg("text", {x: 250, y: 30 + 12 * j}); label.style.fill = COLOURS[j % COLOURS.length]; label.textContent = m; p.svg.appendChild(label);
    });
    return p.svg;
  }
  function scoreTable() {
    var wrap = el("div"), sort = {col: -1, asc: true}, page = 0, rows = EV.rows.slice();
    var pager = el("div", {"class": "pager"}), table = el("table", {id: "scores"});
    function name(r) { return typeof r[0] === "number" ? I.names[r[0]] : String(r[0]); }
    function draw() {
      table.textContent = "";
      var head = el("tr");
      ["input", "method"].concat(EV.metrics).forEach(function (h, c) {
        var th = el("th", {"class": "sortable" + (sort.col === c ? (sort.asc ? " sorted-asc" : " sorted-desc") : ""), "data-col": c}, h);
        th.addEventListener("click", function () {
          sort = {col: c, asc: sort.col === c ? !sort.asc : true};
          rows.sort(function (a, b) {
            var x = c === 0 ? name(a) : c === 1 ? EV.methods[a[1]] : a[c], y = c === 0 ? name(b) : c === 1 ? EV.methods[b[1]] : b[c];
            if (x === null) return 1; if (y === null) return -1;
            return (x < y ? -1 : x > y ? 1 : 0) * (sort.asc ? 1 : -1);
          });
          page = 0; draw();
        });
        head.appendChild(th);
      });
      table.appendChild(head);
      rows.slice(page * SCORE_PAGE, (page + 1) * SCORE_PAGE).forEach(function (r) {
        var tr = el("tr");
        tr.appendChild(el("td", null, name(r)));
        tr.appendChild(el("td", null, EV.methods[r[1]]));
        for (var c = 2; c < r.length; c++) tr.appendChild(el("td", {"class": "num"}, fmt(r[c])));
        table.appendChild(tr);
      });
      var pages = Math.max(1, Math.ceil(rows.length / SCORE_PAGE));
      pager.textContent = rows.length + " rows, page " + (page + 1) + " / " + pages + " ";
      var prev = el("button", null, "‹"), next = el("button", null, "›");
      prev.addEventListener("click", function () { page = Math.max(0, page - 1); draw(); });
      next.addEventListener("click", function () { page = Math.min(pages - 1, page + 1); draw(); });
      pager.appendChild(prev); pager.appendChild(next);
    }
    draw();
    wrap.appendChild(pager); wrap.appendChild(table);
    return wrap;
  }

  // -- analysis -----------------------------------------------------------------------------------
  function renderAnalysis() {
    var root = document.getElementById("analysis");
    if (!AN || !AN.groups.length) { root.appendChild(el("p", {"class": "note"}, "No analysis: run `xai analyze` on the run folder.")); return; }
    root.appendChild(el("p", {"class": "note"}, "from " + AN.folder));
    var pick = el("select", {id: "group"});
    AN.groups.forEach(function (g, k) { pick.appendChild(el("option", {value: k}, g.method + " · class " + className(g["class"]) + " (" + g.members.length + " inputs, " + g.classSource + ")")); });
    var controls = el("div", {"class": "controls"}), label = el("label", null, "group ");
    label.appendChild(pick); controls.appendChild(label);
    var body = el("div");
    root.appendChild(controls); root.appendChild(body);
    pick.addEventListener("change", function () { drawGroup(body, AN.groups[+pick.value]); });
    drawGroup(body, AN.groups[0]);
  }
  function drawGroup(body, g) {
    body.textContent = "";
    var plots = el("div", {"class": "plots"});
    var ev = g.eigenvalues, p = plot(320, 220, ev.map(function (_, k) { return k + 1; }), ev.length ? ev : [0], {title: "eigenvalues" + (g.eigengap ? " — eigengap suggests " + g.eigengap : "")});
    p.svg.setAttribute("id", "spectrum");
    ev.forEach(function (v, k) { p.svg.appendChild(svg("circle", {cx: p.x(k + 1), cy: p.y(v), r: 3, fill: k < (g.eigengap || 0) ? "#2456a6" : "#999"})); });
    if (g.eigengap && g.eigengap < ev.length) {
      var gx = (p.x(g.eigengap) + p.x(g.eigengap + 1)) / 2;
      p.svg.appendChild(svg("line", {"class": "gap", x1: gx, x2: gx, y1: 18, y2: 192}));
    }
    plots.appendChild(p.svg);
    var names = Object.keys(g.clusterings), views = Object.keys(g.views);
    var controls = el("div", {"class": "controls"}), cpick = el("select", {id: "clustering"}), vpick = el("select", {id: "view"});
    names.forEach(function (n) { cpick.appendChild(el("option", {value: n}, n)); });
    views.forEach(function (n) { vpick.appendChild(el("option", {value: n}, n)); });
    cpick.value = g.suggested || names[0];
    var l1 = el("label", null, "clustering "), l2 = el("label", null, "view ");
    l1.appendChild(cpick); l2.appendChild(vpick); controls.appendChild(l1); controls.appendChild(l2);
    var scatterBox = el("div"), legend = el("div", {"class": "legend", id: "clusters"});
    plots.appendChild(scatterBox);
    body.appendChild(controls); body.appendChild(plots);
    body.appendChild(el("h3", null, "Clusters (click one to show its members in the gallery)"));
    body.appendChild(legend);
    function redraw() {
      var c = g.clusterings[cpick.value];
      scatterBox.textContent = ""; legend.textContent = "";
      if (views.length) scatterBox.appendChild(scatter(g, c, g.views[vpick.value]));
      clusterIds(c).forEach(function (id) { legend.appendChild(clusterCard(g, c, id)); });
    }
    cpick.addEventListener("change", redraw); vpick.addEventListener("change", redraw);
    redraw();
  }
  function clusterIds(c) {
    var ids = {};
    c.labels.forEach(function (l) { ids[l] = true; });
    return Object.keys(ids).map(Number).sort(function (a, b) { return a - b; });
  }
  function colour(id) { return id < 0 ? "#aaaaaa" : COLOURS[id % COLOURS.length]; }
  function members(g, c, id) {
    var set = {}, count = 0;
    c.labels.forEach(function (l, k) { if (l === id && g.members[k] !== null) { set[g.members[k]] = true; count++; } });
    return {set: set, count: count, method: g.methodIndex, label: g.method + " · class " + className(g["class"]) + " · " + (id < 0 ? "noise" : "cluster " + id) + " (" + count + ")"};
  }
  function scatter(g, c, points) {
    var p = plot(420, 320, points.map(function (q) { return q[0]; }), points.map(function (q) { return q[1]; }), {title: "2-D view, coloured by cluster"});
    p.svg.setAttribute("id", "scatter");
    var tip = document.getElementById("tooltip");
    points.forEach(function (q, k) {
      var id = c.labels[k], dot = svg("circle", {"class": "point", cx: p.x(q[0]), cy: p.y(q[1]), r: 4, fill: colour(id), "fill-opacity": 0.8, "data-cluster": id});
      dot.addEventListener("mouseenter", function (e) {
        tip.textContent = "";
        var item = g.members[k];
        if (item !== null && g.methodIndex >= 0) tip.appendChild(thumb(item, g.methodIndex));
        tip.appendChild(el("div", null, g.names[k] + " · " + (id < 0 ? "noise" : "cluster " + id)));
        tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; tip.hidden = false;
      });
      dot.addEventListener("mouseleave", function () { tip.hidden = true; });
      dot.addEventListener("click", function () { tip.hidden = true; filterMembers(members(g, c, id)); });
      p.svg.appendChild(dot);
    });
    return p.svg;
  }
  function clusterCard(g, c, id) {
    var card = el("div", {"class": "cluster", "data-cluster": id}), m = members(g, c, id);
    var head = el("div"), sw = el("span", {"class": "swatch"});
    sw.style.background = colour(id);
    head.appendChild(sw);
    head.appendChild(document.createTextNode((id < 0 ? "noise" : "cluster " + id) + " · " + (c.sizes[id] !== undefined ? c.sizes[id] : m.count) + " inputs"));
    card.appendChild(head);
    var pair = el("div", {"class": "pair"});
    if (c.means[id]) {
      var fig = el("figure", {"class": "tile"}), img = el("img", {"class": "mean", src: c.means[id], alt: "mean heatmap"});
      img.addEventListener("error", function () { console.error("xai report: missing mean heatmap " + c.means[id]); });
      fig.appendChild(img); fig.appendChild(el("figcaption", null, "mean")); pair.appendChild(fig);
    }
    var proto = c.prototypes[id];
    if (proto !== undefined && proto !== null && g.methodIndex >= 0) {
      var pf = el("figure", {"class": "tile"});
      pf.appendChild(thumb(proto, g.methodIndex));
      pf.appendChild(el("figcaption", {title: c.prototypeNames[id]}, "prototype"));
      pair.appendChild(pf);
    }
    card.appendChild(pair);
    card.addEventListener("click", function () { filterMembers(m); });
    return card;
  }

  // -- provenance ---------------------------------------------------------------------------------
  function keyValues(title, obj) {
    var t = el("table");
    t.appendChild(el("caption", null, title));
    Object.keys(obj || {}).forEach(function (k) {
      var tr = el("tr"), v = obj[k];
      tr.appendChild(el("th", null, k));
      tr.appendChild(el("td", null, typeof v === "object" && v !== null ? JSON.stringify(v) : v));
      t.appendChild(tr);
    });
    return t;
  }
  function renderProvenance() {
    var P = R.provenance || {}, root = document.getElementById("provenance");
    root.appendChild(el("h2", null, "Run"));
    var model = P.model || {};
    root.appendChild(keyValues("model", {spec: model.spec, digest: model.digest, device: model.device, input: model.input}));
    root.appendChild(keyValues("run", {folder: P.folder, xai: P.xai, seed: P.seed, inputs: P.inputs, counts: P.counts, timings: P.timings}));
    root.appendChild(keyValues("sources", META.sources));
    root.appendChild(keyValues("engine", P.engine));
    root.appendChild(keyValues("versions", P.versions));
    root.appendChild(el("h2", null, "Failed inputs (" + (P.errors || []).length + ")"));
    if ((P.errors || []).length) {
      var t = el("table", {id: "errors"}), head = el("tr");
      ["input", "stage", "cause"].forEach(function (h) { head.appendChild(el("th", null, h)); });
      t.appendChild(head);
      P.errors.slice(0, 1000).forEach(function (e) {
        var tr = el("tr");
        [e.input || e.path, e.stage, e.cause].forEach(function (v) { tr.appendChild(el("td", null, v)); });
        t.appendChild(tr);
      });
      root.appendChild(t);
      if (P.errors.length > 1000) root.appendChild(el("p", {"class": "note"}, (P.errors.length - 1000) + " more in errors.jsonl"));
    }
    if ((P.problems || []).length) {
      root.appendChild(el("h2", null, "Files the report could not read"));
      var ul = el("ul");
      P.problems.forEach(function (p) { ul.appendChild(el("li", null, p)); });
      root.appendChild(ul);
    }
    if (AN) { root.appendChild(el("h2", null, "Analysis settings")); root.appendChild(el("pre", null, JSON.stringify(AN.settings, null, 2))); }
    root.appendChild(el("h2", null, "Recipe"));
    root.appendChild(el("pre", {id: "recipe"}, JSON.stringify(P.recipe, null, 2)));
  }

  // -- tabs and start -----------------------------------------------------------------------------
  function showTab(name) {
    Array.prototype.forEach.call(document.querySelectorAll("section.tab"), function (s) { s.hidden = s.id !== name; });
    Array.prototype.forEach.call(document.querySelectorAll("#tabs button"), function (b) { b.classList.toggle("active", b.getAttribute("data-tab") === name); });
  }
  function start() {
    document.getElementById("title").textContent = "xai report · " + (META.title || "");
    Array.prototype.forEach.call(document.querySelectorAll("#tabs button"), function (b) {
      b.addEventListener("click", function () { showTab(b.getAttribute("data-tab")); });
    });
    setupGallery(); renderGallery(); renderMetrics(); renderAnalysis(); renderProvenance();
    window.xaiReport = {state: state, sheets: sheets, filterMembers: filterMembers, render: renderGallery, visible: visible};
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
