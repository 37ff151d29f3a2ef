// A small Markdown renderer for model output that cannot inject HTML: it never parses text as HTML. It builds
// DOM nodes with createElement and puts every character of the model's text in through text nodes, so a
// "<script>" or "<img onerror=...>" in an answer is shown as those characters. Only these constructs become
// elements: fenced code blocks (also an unclosed one, while it streams), inline code, **bold**, *italic* /
// _italic_, "#" headings, "-", "*", "+" and "1." lists, paragraphs and line breaks. Links stay text.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
// Inline spans, first match wins: `code`, **bold** / __bold__, *italic* / _italic_.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/;

/** The Markdown of `text` as a DocumentFragment of safe elements. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  const headingLevels = pageHeadingLevels(lines);
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      // Everything up to the closing fence (or the end, while the answer is still streaming) is code.
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[1]) && lines[i].trim() === fence[1])) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1;
      fragment.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      fragment.append(withInline(document.createElement(`h${headingLevels.get(heading[1].length)}`), heading[2]));
      i += 1;
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = document.createElement(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.start = start;
      }
      while (i < lines.length && pattern.test(lines[i])) {
        const match = pattern.exec(lines[i]);
        list.append(withInline(document.createElement("li"), ordered ? match[2] : match[1]));
        i += 1;
      }
      fragment.append(list);
      continue;
    }
    // A paragraph: the following lines up to a blank line or the start of another block.
    const body = [line];
    i += 1;
    while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i])) {
      body.push(lines[i]);
      i += 1;
    }
    const paragraph = document.createElement("p");
    body.forEach((part, n) => {
      if (n > 0) paragraph.append(document.createElement("br"));
      appendInline(paragraph, part);
    });
    fragment.append(paragraph);
  }
  return fragment;
}

// The page has its own h1 and h2 ("Chat"): an answer's headings go under them, its levels in use mapped in
// order to h3, h4, ... so that an answer opening with "## Title", or going from "#" to "###", skips no level
// of the page's outline (screen readers navigate by it). Headings inside code fences do not count.
function pageHeadingLevels(lines) {
  const used = new Set();
  let fence = null;
  for (const line of lines) {
    if (fence) {
      if (line.trim() === fence) fence = null;
      continue;
    }
    const opening = FENCE.exec(line);
    if (opening) fence = opening[1];
    else if (HEADING.test(line)) used.add(HEADING.exec(line)[1].length);
  }
  return new Map([...used].sort((a, b) => a - b).map((level, rank) => [level, Math.min(3 + rank, 6)]));
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

function codeBlock(source, language) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (language) code.dataset.language = language; // a data attribute: never a class or style from the model
  code.textContent = source;
  pre.append(code);
  pre.tabIndex = 0; // long lines scroll sideways: keyboard users can reach and scroll the block
  // A focusable block needs a name for a screen reader to say when focus lands on it.
  pre.setAttribute("role", "group");
  pre.setAttribute("aria-label", language ? `code, ${language}` : "code");
  return pre;
}

function withInline(element, text) {
  appendInline(element, text);
  return element;
}

function appendInline(parent, text) {
  let rest = text;
  while (rest) {
    const match = INLINE.exec(rest);
    if (!match) {
      parent.append(document.createTextNode(rest));
      return;
    }
    if (match.index > 0) parent.append(document.createTextNode(rest.slice(0, match.index)));
    if (match[1] !== undefined) {
      const code = document.createElement("code");
      code.textContent = match[2].trim() || match[2];
      parent.append(code);
    } else {
      const strong = match[3] ?? match[4];
      const element = document.createElement(strong !== undefined ? "strong" : "em");
      appendInline(element, strong ?? match[5] ?? match[6]);
      parent.append(element);
    }
    rest = rest.slice(match.index + match[0].length);
  }
}
