/* A small GitHub-flavoured markdown renderer for CDS Hooks card details.
 *
 * CdsMarkdown.render(text) -> DocumentFragment
 *
 * Builds DOM nodes; never assigns innerHTML. Raw HTML in the markdown is shown as text (escaped),
 * as the checklist recommends for card details. Supported: paragraphs, soft and hard line breaks,
 * ATX headings (rendered from h4 down, inside a card), bullet and numbered lists (nested by
 * indentation), block quotes, fenced code, thematic breaks, GFM tables; inline: code, **strong**,
 * *emphasis*, ~~strikethrough~~, [links](https://...), <https://autolinks> and bare https:// URLs,
 * backslash escapes. Links are kept only for http(s) and mailto URLs and open in a new tab.
 */
(function (global) {
  "use strict";

  var SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function el(tag, children) {
    var node = document.createElement(tag);
    (children || []).forEach(function (child) { node.appendChild(child); });
    return node;
  }

  function link(href, children) {
    if (!SAFE_URL.test(href)) {
      var span = el("span", children);
      return span;
    }
    var a = el("a", children);
    a.setAttribute("href", href);
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer");
    return a;
  }

  // Inline rules, tried at every position; the earliest match wins, ties go to the first rule.
  var INLINE = [
    { re: /\\([\\`*_{}\[\]()#+\-.!~|<>])/, make: function (m) { return document.createTextNode(m[1]); } },
    { re: /(`+)([\s\S]*?[^`])\1(?!`)/, make: function (m) { return el("code", [document.createTextNode(m[2].trim() || m[2])]); } },
    { re: /<((?:https?:\/\/|mailto:)[^>\s]+)>/, make: function (m) { return link(m[1], [document.createTextNode(m[1])]); } },
    { re: /\[([^\]]+)\]\(\s*([^)\s]+)(?:\s+"[^"]*")?\s*\)/, make: function (m) { return link(m[2], inline(m[1])); } },
    { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: function (m) { return el("strong", inline(m[1])); } },
    { re: /(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])/, make: function (m) { return el("strong", inline(m[1])); } },
    { re: /~~(?=\S)([\s\S]*?\S)~~/, make: function (m) { return el("del", inline(m[1])); } },
    { re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*/, make: function (m) { return el("em", inline(m[1])); } },
    { re: /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/, make: function (m) { return el("em", inline(m[1])); } },
    { re: /https?:\/\/[^\s<]*[^\s<.,;:!?)\]'"*_~]/, make: function (m) { return link(m[0], [document.createTextNode(m[0])]); } },
  ];

  function inline(text) {
    var nodes = [];
    var rest = text;
    while (rest) {
      var best = null;
      for (var i = 0; i < INLINE.length; i++) {
        var m = INLINE[i].re.exec(rest);
        if (m && (best === null || m.index < best.m.index)) best = { m: m, rule: INLINE[i] };
      }
      if (!best) { pushText(nodes, rest); break; }
      if (best.m.index > 0) pushText(nodes, rest.slice(0, best.m.index));
      nodes.push(best.rule.make(best.m));
      rest = rest.slice(best.m.index + best.m[0].length);
    }
    return nodes;
  }

  // Text with line breaks: a newline after two spaces or a backslash is a hard break, else a space.
  function pushText(nodes, text) {
    var parts = text.split(/( {2,}|\\)\n/);
    for (var i = 0; i < parts.length; i += 2) {
      if (i > 0) nodes.push(document.createElement("br"));
      nodes.push(document.createTextNode(parts[i].replace(/\n/g, " ")));
    }
  }

  var LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  var FENCE = /^\s{0,3}(```+|~~~+)\s*([\w-]*)\s*$/;
  var HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  var RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  var QUOTE = /^\s{0,3}>\s?(.*)$/;
  var TABLE_DIVIDER = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function startsBlock(lines, i) {
    var line = lines[i];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line) || isTable(lines, i);
  }

  function isTable(lines, i) {
    return lines[i].indexOf("|") >= 0 && i + 1 < lines.length && lines[i + 1].indexOf("-") >= 0 && TABLE_DIVIDER.test(lines[i + 1]);
  }

  function cells(line) {
    var trimmed = line.trim().replace(/^\|/, "").replace(/(^|[^\\])\|$/, "$1");
    return trimmed.split(/(?<!\\)\|/).map(function (cell) { return cell.trim().replace(/\\\|/g, "|"); });
  }

  function indentOf(line) { return line.match(/^\s*/)[0].replace(/\t/g, "    ").length; }

  function parseList(lines, i, parent) {
    var first = LIST_ITEM.exec(lines[i]);
    var baseIndent = indentOf(lines[i]);
    var ordered = /\d/.test(first[2]);
    var list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.setAttribute("start", String(parseInt(first[2], 10)));
    while (i < lines.length) {
      var m = LIST_ITEM.exec(lines[i]);
      if (!m || indentOf(lines[i]) !== baseIndent || /\d/.test(m[2]) !== ordered) break;
      var body = [m[3]];
      var children = [];
      i++;
      while (i < lines.length && lines[i].trim() !== "") {
        var sub = LIST_ITEM.exec(lines[i]);
        if (sub && indentOf(lines[i]) > baseIndent) {
          var nested = document.createDocumentFragment();
          i = parseList(lines, i, nested);
          children.push(nested);
          continue;
        }
        if (sub || (indentOf(lines[i]) <= baseIndent && startsBlock(lines, i))) break;
        body.push(lines[i].trim());
        i++;
      }
      var item = el("li", inline(body.join("\n")));
      children.forEach(function (child) { item.appendChild(child); });
      list.appendChild(item);
      if (i < lines.length && lines[i].trim() === "" && i + 1 < lines.length && LIST_ITEM.test(lines[i + 1]) && indentOf(lines[i + 1]) === baseIndent) i++;
    }
    parent.appendChild(list);
    return i;
  }

  function blocks(lines, parent) {
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var m;
      if (line.trim() === "") { i++; continue; }
      if ((m = FENCE.exec(line))) {
        var code = [];
        i++;
        while (i < lines.length && !(lines[i].trim().indexOf(m[1]) === 0 && lines[i].trim().replace(/[`~]/g, "") === "")) code.push(lines[i++]);
        i++;
        parent.appendChild(el("pre", [el("code", [document.createTextNode(code.join("\n"))])]));
      } else if ((m = HEADING.exec(line))) {
        parent.appendChild(el("h" + Math.min(6, m[1].length + 3), inline(m[2])));
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        var quoted = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { quoted.push(m[1]); i++; }
        var quote = el("blockquote");
        blocks(quoted, quote);
        parent.appendChild(quote);
      } else if (LIST_ITEM.test(line)) {
        i = parseList(lines, i, parent);
      } else if (isTable(lines, i)) {
        var head = cells(line);
        var aligns = cells(lines[i + 1]).map(function (c) {
          return /^:-+:$/.test(c) ? "center" : /-:$/.test(c) ? "right" : /^:-/.test(c) ? "left" : "";
        });
        var table = el("table");
        var tr = el("tr");
        head.forEach(function (c, k) {
          var th = el("th", inline(c));
          th.setAttribute("scope", "col");
          if (aligns[k]) th.className = "align-" + aligns[k];
          tr.appendChild(th);
        });
        table.appendChild(el("thead", [tr]));
        var tbody = el("tbody");
        i += 2;
        while (i < lines.length && lines[i].trim() !== "" && lines[i].indexOf("|") >= 0) {
          var row = el("tr");
          cells(lines[i]).forEach(function (c, k) {
            if (k >= head.length) return;
            var td = el("td", inline(c));
            if (aligns[k]) td.className = "align-" + aligns[k];
            row.appendChild(td);
          });
          tbody.appendChild(row);
          i++;
        }
        table.appendChild(tbody);
        parent.appendChild(table);
      } else {
        var para = [line.replace(/^\s+/, "")];
        i++;
        while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines, i)) para.push(lines[i++].replace(/^\s+/, ""));
        parent.appendChild(el("p", inline(para.join("\n").replace(/\s+$/, ""))));
      }
    }
  }

  function render(text) {
    var fragment = document.createDocumentFragment();
    if (typeof text !== "string" || !text) return fragment;
    blocks(text.replace(/\r\n?/g, "\n").split("\n"), fragment);
    return fragment;
  }

  global.CdsMarkdown = { render: render };
})(window);
