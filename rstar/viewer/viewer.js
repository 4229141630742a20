// rStar tree viewer: draws one search (the rstar.view/1 JSON of rstar/viewer/model.py) as an SVG tree.
// Plain JS, no library and no request except view.json on the page's own origin. Every string from the
// tree (steps, code, program output) is inserted as text, never as HTML: a program may print anything.
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var DY = 22, R = 6, LABEL = 24, BIG = 1500;   // row height, node radius, label chars, "big tree" size
  var dx = 170;                                  // column width (zoom)
  var view = null, byId = new Map(), collapsed = new Set(), chosen = new Set(), selected = null;
  var matches = [], matchAt = -1, token = null;

  function $(id) { return document.getElementById(id); }

  function h(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function s(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }

  function num(x, digits) {
    if (x === null || x === undefined) return "-";
    var v = Number(x);
    return (v >= 0 ? "+" : "") + v.toFixed(digits === undefined ? 3 : digits);
  }

  function kindOf(n) {
    if (n.terminal === "answer" && n.correct === false) return "wrong";
    return n.terminal || "";
  }

  // ------------------------------------------------------------ loading

  function readToken() {
    // a bearer token can come in the fragment (#token=...; never sent to a server), kept for this tab
    var m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem("rstar-view-token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem("rstar-view-token");
  }

  function load() {
    var embedded = $("rstar-view");
    if (embedded) return Promise.resolve(JSON.parse(embedded.textContent));
    var headers = token ? { "Authorization": "Bearer " + token } : {};
    return fetch("view.json" + location.search, { cache: "no-store", headers: headers }).then(function (r) {
      return r.json().catch(function () { return { error: r.status + " " + r.statusText }; }).then(function (d) {
        if (!r.ok) throw new Error(d.error || (r.status + " " + r.statusText));
        return d;
      });
    });
  }

  function showError(msg) {
    var e = $("error");
    e.hidden = !msg;
    e.textContent = msg || "";
  }

  function accept(data, first) {
    view = data;
    if (data.kind === "index") return renderIndex(data);
    byId = new Map();
    data.nodes.forEach(function (n) { byId.set(n.id, n); });
    chosen = new Set(data.chosen || []);
    var keep = new Set();
    collapsed.forEach(function (id) { if (byId.has(id)) keep.add(id); });
    collapsed = keep;
    if (first) {
      if (data.nodes.length > BIG) collapseOffPath();
      var m = /(?:^#|&)node=(\d+)/.exec(location.hash);
      var want = m ? Number(m[1]) : (data.chosen && data.chosen.length ? data.chosen[data.chosen.length - 1] : 0);
      selected = byId.has(want) ? want : 0;
      revealNode(selected);
    } else if (!byId.has(selected)) {
      selected = 0;
    }
    renderSummary();
    renderAlternatives();
    renderStats();
    renderGraph();
    renderDetails();
    renderLive();
    document.body.dataset.nodes = String(data.nodes.length);
    document.body.dataset.ready = "1";
    if (first) scrollToNode(selected);
  }

  function renderLive() {
    var live = view.live, box = $("live");
    box.hidden = !live;
    if (!live) return;
    var p = live.progress || {};
    var parts = [live.running ? "searching" : (live.error ? "failed" : "finished")];
    if (p.rollouts_total) parts.push("rollout " + p.rollouts_done + "/" + p.rollouts_total);
    if (p.best_answer) parts.push("best " + p.best_answer + " (" + num(p.best_score, 2) + ")");
    if (p.generated_tokens) parts.push(p.generated_tokens + " tokens");
    if (p.elapsed_seconds) parts.push(Number(p.elapsed_seconds).toFixed(1) + " s");
    if (live.error) parts.push(live.error);
    box.textContent = parts.join(" \u00b7 ");
    if (live.running) setTimeout(refresh, 1000);
  }

  function refresh() {
    load().then(function (d) { showError(""); accept(d, false); })
      .catch(function (e) { showError(String(e.message || e)); setTimeout(refresh, 2000); });
  }

  // ------------------------------------------------------------ listing (the search service's /view/)

  function renderIndex(data) {
    $("title").textContent = data.title;
    $("node-count").textContent = data.entries.length + " entries";
    $("graph").hidden = true;
    var ul = $("index");
    ul.hidden = false;
    ul.textContent = "";
    if (!data.entries.length) ul.appendChild(h("li", {}, "no complete shards in the store"));
    data.entries.forEach(function (e) {
      var li = h("li");
      li.appendChild(h("a", { href: "?ref=" + encodeURIComponent(e.ref) }, e.label));
      var extra = e.nodes !== undefined ? " " + e.nodes + " nodes" + (e.solved ? ", solved" : "")
        : (e.trees !== undefined ? " " + e.trees + " trees" : "");
      li.appendChild(h("span", { "class": "dim" }, extra));
      ul.appendChild(li);
    });
    document.body.dataset.ready = "1";
  }

  // ------------------------------------------------------------ the graph

  function layout() {
    // leaves take consecutive rows; a parent sits between its first and last visible child
    var pos = new Map(), order = [], rows = 0, maxDepth = 0;
    (function walk(id) {
      var n = byId.get(id);
      order.push(n);
      maxDepth = Math.max(maxDepth, n.depth);
      var kids = collapsed.has(id) ? [] : n.children;
      if (!kids.length) { pos.set(id, rows++); return; }
      kids.forEach(walk);
      pos.set(id, (pos.get(kids[0]) + pos.get(kids[kids.length - 1])) / 2);
    })(0);
    return { pos: pos, order: order, rows: rows, maxDepth: maxDepth };
  }

  function descendants(id) {
    var count = 0, stack = byId.get(id).children.slice();
    while (stack.length) { var c = stack.pop(); count++; stack.push.apply(stack, byId.get(c).children); }
    return count;
  }

  function label(n) {
    if (n.parent === null) return "question";
    var t;
    if (n.answer !== null && n.answer !== undefined) t = "= " + n.answer;
    else if (n.failure) t = "\u2717 " + n.failure;
    else {
      // the first line of the step that is neither a marker nor a comment tells siblings apart best
      var src = (n.code || n.text || "").split("\n").map(function (l) { return l.trim(); })
        .filter(function (l) { return l && l.charAt(0) !== "<"; });
      var plain = src.filter(function (l) { return l.charAt(0) !== "#"; });
      t = plain.length ? plain[0] : (src.length ? src[0] : "(step)");
    }
    return t.length > LABEL ? t.slice(0, LABEL - 1) + "\u2026" : t;
  }

  function renderGraph() {
    var g = $("graph"), L = layout();
    var x = function (n) { return 20 + n.depth * dx; };
    var y = function (id) { return 20 + L.pos.get(id) * DY; };
    g.hidden = false;
    g.textContent = "";
    g.setAttribute("width", String(60 + L.maxDepth * dx + 260));
    g.setAttribute("height", String(40 + L.rows * DY));
    var edges = s("g", { "class": "edges" }), nodes = s("g", { "class": "nodes" });
    var matchSet = new Set(matches);
    L.order.forEach(function (n) {
      if (n.parent !== null) {
        var p = byId.get(n.parent), x1 = x(p), y1 = y(p.id), x2 = x(n), y2 = y(n.id), xm = (x1 + x2) / 2;
        edges.appendChild(s("path", {
          "class": "edge" + (chosen.has(n.id) && chosen.has(p.id) ? " chosen" : ""),
          d: "M" + x1 + "," + y1 + " C" + xm + "," + y1 + " " + xm + "," + y2 + " " + x2 + "," + y2,
        }));
      }
      var cls = ["node"];
      var k = kindOf(n);
      if (k) cls.push("kind-" + k);
      if (n.parent === null) cls.push("root");
      if (chosen.has(n.id)) cls.push("chosen");
      if (n.id === selected) cls.push("selected");
      if (matchSet.has(n.id)) cls.push("match");
      var node = s("g", { "class": cls.join(" "), "data-id": String(n.id),
                          transform: "translate(" + x(n) + "," + y(n.id) + ")" });
      var title = s("title");
      title.textContent = "#" + n.id + "  Q=" + num(n.q) + "  N=" + n.n + "  ppm=" + num(n.ppm)
        + (n.terminal ? "  [" + n.terminal + (n.failure ? ": " + n.failure : "") + "]" : "");
      node.appendChild(title);
      node.appendChild(s("circle", { r: String(R) }));
      var t = s("text", { "class": "label", x: String(R + 4), y: "4" });
      t.textContent = label(n);
      node.appendChild(t);
      if (collapsed.has(n.id) && n.children.length) {
        var more = s("text", { "class": "more", x: String(R + 8 + LABEL * 6.7), y: "4" });
        more.textContent = "+" + descendants(n.id);
        node.appendChild(more);
      }
      nodes.appendChild(node);
    });
    g.appendChild(edges);
    g.appendChild(nodes);
    document.body.dataset.rendered = String(L.order.length);
  }

  function scrollToNode(id) {
    var e = document.querySelector('.node[data-id="' + id + '"]');
    if (e && e.scrollIntoView) e.scrollIntoView({ block: "center", inline: "center" });
  }

  function revealNode(id) {
    var cur = byId.get(id);
    while (cur && cur.parent !== null) { collapsed.delete(cur.parent); cur = byId.get(cur.parent); }
  }

  function collapseOffPath() {
    collapsed = new Set();
    byId.forEach(function (n) { if (n.children.length && !chosen.has(n.id)) collapsed.add(n.id); });
  }

  function toggle(id) {
    if (!byId.get(id).children.length) return;
    if (collapsed.has(id)) collapsed.delete(id); else collapsed.add(id);
    renderGraph();
    renderDetails();
  }

  function select(id) {
    // only the marks change: rebuilding the SVG here would swap the element under a double-click
    var old = document.querySelector("#graph .node.selected");
    if (old) old.classList.remove("selected");
    var now = document.querySelector('#graph .node[data-id="' + id + '"]');
    if (now) now.classList.add("selected");
    selected = id;
    history.replaceState(null, "", location.pathname + location.search + "#node=" + id);
    renderDetails();
  }

  // ------------------------------------------------------------ the side panel

  function kv(pairs) {
    var dl = h("dl", { "class": "kv" });
    pairs.forEach(function (p) {
      if (p[1] === undefined || p[1] === null || p[1] === "") return;
      dl.appendChild(h("dt", {}, p[0]));
      dl.appendChild(h("dd", {}, p[1]));
    });
    return dl;
  }

  function block(cls, id, body, empty) {
    var pre = h("pre", { "class": cls + (body ? "" : " empty"), id: id }, body || empty);
    return pre;
  }

  function renderSummary() {
    var box = $("summary");
    box.textContent = "";
    $("title").textContent = view.title || "search tree";
    var total = view.stats && view.stats.nodes;
    $("node-count").textContent = view.nodes.length + " nodes"
      + (view.complete ? "" : " (finished trajectories; " + (total || 0) + " nodes searched)");
    box.appendChild(h("h2", {}, view.kind === "tree" ? "stored tree" : "solve"));
    if (view.source) box.appendChild(h("div", { "class": "dim" }, view.source));
    if (view.question) box.appendChild(h("p", { "class": "question" }, view.question));
    box.appendChild(kv([
      ["answer", view.answer || "(none found)"],
      ["gold", view.gold],
      ["solved", view.solved === null || view.solved === undefined ? null : (view.solved ? "yes" : "no")],
      ["strategy", view.strategy],
      ["seed", view.seed],
    ]));
    if (!view.complete) {
      box.appendChild(h("p", { "class": "dim" }, "A solve result carries its finished trajectories, not the "
        + "unfinished branches: the graph shows those trajectories merged by shared steps."));
    }
  }

  function renderDetails() {
    var box = $("details"), n = byId.get(selected);
    box.textContent = "";
    if (!n) return;
    document.body.dataset.selected = String(n.id);
    var head = h("h2", {}, n.parent === null ? "question (root)" : "node #" + n.id + " \u00b7 depth " + n.depth);
    box.appendChild(head);
    var badges = h("div");
    if (chosen.has(n.id)) badges.appendChild(h("span", { "class": "badge chosen" }, "chosen path"));
    var k = kindOf(n);
    if (k) badges.appendChild(h("span", { "class": "badge kind-" + k }, k === "wrong" ? "wrong answer" : k));
    box.appendChild(badges);
    box.appendChild(kv([
      ["Q", num(n.q)], ["N", String(n.n)], ["PPM score", num(n.ppm)],
      ["terminal", n.terminal || "no"],
      ["failure", n.failure ? n.failure + (n.why ? " \u2013 " + n.why : "") : null],
      ["answer", n.answer === null || n.answer === undefined ? null
        : n.answer + (n.correct === true ? " (correct)" : n.correct === false ? " (wrong)" : "")],
      ["tokens", n.tokens ? String(n.tokens) : null],
      ["finish", n.finish_reason && n.finish_reason !== "stop" ? n.finish_reason : null],
      ["children", n.children.length ? n.children.length + " (" + descendants(n.id) + " below)" : null],
    ]));
    if (n.parent !== null) {
      box.appendChild(h("div", { "class": "dim" }, "code"));
      box.appendChild(block("code", "node-code", n.code, "(no code in this step)"));
      box.appendChild(h("div", { "class": "dim" }, "program output"));
      box.appendChild(block("output", "node-output", n.output, "(nothing printed / not run)"));
    }
    box.appendChild(h("div", { "class": "dim" }, n.parent === null ? "question" : "step text"));
    box.appendChild(block("text", "node-text", n.text, "(empty)"));
    var tools = h("div");
    if (n.children.length) {
      var b = h("button", { type: "button", id: "toggle-node" }, collapsed.has(n.id) ? "expand" : "collapse");
      b.addEventListener("click", function () { toggle(n.id); });
      tools.appendChild(b);
    }
    if (n.parent !== null) {
      var up = h("button", { type: "button" }, "parent");
      up.addEventListener("click", function () { select(n.parent); scrollToNode(n.parent); });
      tools.appendChild(up);
    }
    box.appendChild(tools);
  }

  function renderAlternatives() {
    var box = $("alternatives");
    box.textContent = "";
    box.appendChild(h("h2", {}, "answers"));
    var alts = view.alternatives || [];
    if (!alts.length) { box.appendChild(h("p", { "class": "dim" }, "no answer reached")); return; }
    var table = h("table"), head = h("tr");
    ["answer", "votes", "best", "weighted", ""].forEach(function (c) { head.appendChild(h("th", {}, c)); });
    table.appendChild(head);
    alts.forEach(function (a) {
      var tr = h("tr", { "class": a.chosen ? "chosen" : "" });
      tr.appendChild(h("td", {}, a.answer));
      tr.appendChild(h("td", {}, a.votes));
      tr.appendChild(h("td", {}, num(a.best_score)));
      tr.appendChild(h("td", {}, Number(a.weighted_score).toFixed(3)));
      tr.appendChild(h("td", {}, (a.chosen ? "chosen" : "")
        + (a.correct === true ? " \u2713" : a.correct === false ? " \u2717" : "")));
      table.appendChild(tr);
    });
    box.appendChild(table);
  }

  function renderStats() {
    var box = $("stats"), st = view.stats || {}, t = view.times;
    box.textContent = "";
    box.appendChild(h("h2", {}, "stats"));
    box.appendChild(kv(Object.keys(st).map(function (k) { return [k.replace(/_/g, " "), String(st[k])]; })));
    if (t && t.total_seconds) {
      box.appendChild(h("div", { "class": "dim" }, "time per stage (total " + t.total_seconds.toFixed(2) + " s)"));
      var bar = s("svg", { "class": "bar", width: "400", height: "14" }), off = 0;
      var legend = h("div");
      ["generate", "ppm", "sandbox", "other"].forEach(function (stage) {
        var sec = t[stage + "_seconds"] || 0, w = 400 * sec / t.total_seconds;
        bar.appendChild(s("rect", { "class": stage, x: String(off), y: "0", width: String(w), height: "14" }));
        off += w;
        legend.appendChild(h("span", { "class": "swatch " + stage }));
        legend.appendChild(document.createTextNode(stage + " " + sec.toFixed(2) + " s  "));
      });
      box.appendChild(bar);
      box.appendChild(legend);
    }
    var mv = view.model_versions || {};
    box.appendChild(h("div", { "class": "dim" }, "model versions"));
    box.appendChild(kv(Object.keys(mv).sort().map(function (k) { return [k, mv[k]]; })));
    if (!Object.keys(mv).length) box.appendChild(h("p", { "class": "dim" }, "-"));
    var set = view.settings || {};
    if (Object.keys(set).length) {
      box.appendChild(h("div", { "class": "dim" }, "settings"));
      box.appendChild(kv(Object.keys(set).map(function (k) { return [k, String(set[k])]; })));
    }
  }

  // ------------------------------------------------------------ search

  function search(q) {
    q = q.trim().toLowerCase();
    matches = [];
    matchAt = -1;
    if (q) {
      var idq = /^#(\d+)$/.exec(q);
      byId.forEach(function (n) {
        var hay = [n.text, n.code, n.output, n.answer || "", n.failure].join("\n").toLowerCase();
        if (idq ? n.id === Number(idq[1]) : hay.indexOf(q) >= 0) matches.push(n.id);
      });
      matches.forEach(revealNode);
    }
    $("match-count").textContent = q ? matches.length + (matches.length === 1 ? " match" : " matches") : "";
    renderGraph();
  }

  function nextMatch() {
    if (!matches.length) return;
    matchAt = (matchAt + 1) % matches.length;
    select(matches[matchAt]);
    scrollToNode(matches[matchAt]);
  }

  // ------------------------------------------------------------ wiring

  function wire() {
    var g = $("graph");
    g.addEventListener("click", function (ev) {
      var n = ev.target.closest && ev.target.closest(".node");
      if (n) select(Number(n.getAttribute("data-id")));
    });
    g.addEventListener("dblclick", function (ev) {
      var n = ev.target.closest && ev.target.closest(".node");
      if (n) toggle(Number(n.getAttribute("data-id")));
    });
    var timer = null;
    $("search").addEventListener("input", function (ev) {
      clearTimeout(timer);
      timer = setTimeout(function () { search(ev.target.value); }, 120);
    });
    $("search").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { clearTimeout(timer); if (matchAt < 0) search(ev.target.value); nextMatch(); }
    });
    $("expand-all").addEventListener("click", function () { collapsed = new Set(); renderGraph(); renderDetails(); });
    $("collapse-off-path").addEventListener("click", function () {
      collapseOffPath(); revealNode(selected); renderGraph(); renderDetails();
    });
    $("zoom-in").addEventListener("click", function () { dx = Math.min(400, dx * 1.25); renderGraph(); });
    $("zoom-out").addEventListener("click", function () { dx = Math.max(40, dx / 1.25); renderGraph(); });
  }

  token = readToken();
  wire();
  load().then(function (d) { accept(d, true); })
    .catch(function (e) { showError(String(e.message || e)); document.body.dataset.ready = "error"; });
})();
