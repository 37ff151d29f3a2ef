// Number formatting shared by the page's panels: bytes stay bytes in the data, MiB/GiB only on screen.

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  if (Math.abs(bytes) >= GiB) return `${(bytes / GiB).toFixed(2)} GiB`;
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

export function formatRate(perSecond) {
  if (perSecond === null || perSecond === undefined || Number.isNaN(perSecond)) return "–";
  return perSecond >= 100 ? perSecond.toFixed(0) : perSecond.toFixed(1);
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds >= 1 ? `${seconds.toFixed(2)} s` : `${(seconds * 1000).toFixed(0)} ms`;
}

// A box that scrolls sideways (a wide table on a phone) takes keyboard focus while it overflows, so that the
// arrow keys can scroll it; while it fits it is no tab stop. Its name says what a screen reader lands on.
const overflowWatch = new ResizeObserver((entries) => {
  for (const { target } of entries) {
    if (!target.isConnected) overflowWatch.unobserve(target); // a panel redrawn: the old box is gone
    else if (target.scrollWidth > target.clientWidth) target.tabIndex = 0;
    else target.removeAttribute("tabindex");
  }
});

export function scrollsByKeyboard(box, name) {
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", name);
  overflowWatch.observe(box);
  return box;
}

/** An element with text (always text: nothing from the server is parsed as HTML) and optional class. */
export function el(tag, text, className) {
  const element = document.createElement(tag);
  if (text !== undefined && text !== null) element.textContent = String(text);
  if (className) element.className = className;
  return element;
}
