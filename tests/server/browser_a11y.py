"""Accessibility measured in a real chromium, for the web page's tests (test_server_web.py).

Contrast: the browser reports each visible text's colour and the backgrounds under it up to the first opaque
one; the WCAG 2.x arithmetic (compositing, relative luminance, ratio, large text) is done here. What a screen
reader is given: chromium's accessibility tree over CDP (Accessibility.getFullAXTree). axe-core, when
`make test` could fetch it from the npm registry into .cache/axe/, is injected from that file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
AXE_PATH = ROOT / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
AXE_MIN_RULES_PASSED = 20  # the drawn page passes 49 of axe-core 4.14's rules; an empty page far fewer

# WCAG 2.x, 1.4.3: 4.5:1 for text, 3:1 for large text (18 pt, or 14 pt bold; 1 pt = 4/3 px);
# 1.4.11: 3:1 for what identifies a control (its boundary or fill) and for a focus indicator.
TEXT_MIN_RATIO = 4.5
LARGE_TEXT_MIN_RATIO = 3.0
NON_TEXT_MIN_RATIO = 3.0
LARGE_TEXT_PX = 24.0
LARGE_BOLD_TEXT_PX = 18.5  # 14 pt is 18.67 px; browsers round font sizes, so 18.5 keeps 14 pt bold large
BOLD_WEIGHT = 700


@dataclass(frozen=True)
class Rgba:
    """An sRGB colour, channels 0-255, alpha 0-1."""

    r: float
    g: float
    b: float
    a: float = 1.0

    @classmethod
    def of(cls, channels: list[float]) -> Rgba:
        return cls(*channels)

    def over(self, below: Rgba) -> Rgba:
        """Source-over compositing onto an opaque colour, as the browser paints a translucent layer."""
        keep = 1.0 - self.a
        return Rgba(self.r * self.a + below.r * keep, self.g * self.a + below.g * keep,
                    self.b * self.a + below.b * keep, 1.0)  # fmt: skip

    def faded(self, opacity: float) -> Rgba:
        return Rgba(self.r, self.g, self.b, self.a * opacity)

    def __str__(self) -> str:
        return f"#{round(self.r):02x}{round(self.g):02x}{round(self.b):02x}" + ("" if self.a >= 1 else f"@{self.a:.2f}")


def relative_luminance(colour: Rgba) -> float:
    """WCAG 2.x relative luminance of an opaque sRGB colour."""

    def linear(channel: float) -> float:
        c = channel / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(colour.r) + 0.7152 * linear(colour.g) + 0.0722 * linear(colour.b)


def contrast_ratio(first: Rgba, second: Rgba) -> float:
    lighter, darker = sorted((relative_luminance(first), relative_luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def flatten(layers: list[Rgba]) -> Rgba:
    """The colour seen through background layers listed from the element outwards; the last one is opaque."""
    seen = layers[-1]
    for layer in reversed(layers[:-1]):
        seen = layer.over(seen)
    return seen


# The browser's side: colours as it resolves them (a 1x1 canvas turns any CSS colour syntax into sRGB bytes),
# and the background layers under an element, walking up the DOM to the first opaque one. A background image
# (a gradient) on the way cannot be measured from colours and is reported instead.
COLOUR_JS = """
const canvas = document.createElement('canvas');
canvas.width = canvas.height = 1;
const paint = canvas.getContext('2d', {willReadFrequently: true});
function rgba(css) {
  paint.clearRect(0, 0, 1, 1);
  paint.fillStyle = '#000';
  paint.fillStyle = css;
  paint.fillRect(0, 0, 1, 1);
  const [r, g, b, a] = paint.getImageData(0, 0, 1, 1).data;
  return a === 0 ? [0, 0, 0, 0] : [r, g, b, a / 255];
}
function where(node) {
  const parts = [];
  for (let e = node; e && e !== document.body && parts.length < 4; e = e.parentElement) {
    let part = e.tagName.toLowerCase();
    if (e.id) { parts.unshift(part + '#' + e.id); break; }
    if (e.classList.length) part += '.' + [...e.classList].join('.');
    parts.unshift(part);
  }
  return parts.join(' > ');
}
function canvasColour() {
  const probe = document.createElement('div');
  probe.style.backgroundColor = 'Canvas';
  document.documentElement.append(probe);
  const colour = getComputedStyle(probe).backgroundColor;
  probe.remove();
  return rgba(colour);
}
function backgrounds(start) {
  const layers = [];
  for (let e = start; e; e = e.parentElement) {
    const style = getComputedStyle(e);
    if (style.backgroundImage !== 'none') return {layers, image: where(e)};
    const colour = rgba(style.backgroundColor);
    if (colour[3] > 0) layers.push(colour);
    if (colour[3] >= 1) return {layers, image: null};
  }
  layers.push(canvasColour());
  return {layers, image: null};
}
function opacity(node) {
  let value = 1;
  for (let e = node; e; e = e.parentElement) value *= Number(getComputedStyle(e).opacity);
  return value;
}
function shown(e) {
  if (!e.checkVisibility({visibilityProperty: true, contentVisibilityAuto: true})) return false;
  const box = e.getBoundingClientRect();
  // 1 px boxes are the visually-hidden labels (read, not shown); the skip link waits off-screen at -999px.
  return box.width > 1 && box.height > 1 && box.right > 0 && box.bottom > 0;
}
"""

TEXTS_JS = (
    COLOUR_JS
    + """
const root = document.querySelector(arguments[0]);
const found = [];
const controls = 'input:not([type=checkbox]):not([type=radio]):not([type=hidden]), textarea, select';
for (const e of [root, ...root.querySelectorAll('*')]) {
  if (['SCRIPT', 'STYLE', 'OPTION', 'OPTGROUP'].includes(e.tagName) || !shown(e)) continue;
  // Disabled controls are exempt from 1.4.3 (inactive user interface components).
  if (e.closest(':disabled')) continue;
  const style = getComputedStyle(e);
  let text = [...e.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.data).join('').trim();
  let colour = style.color;
  if (e.matches(controls)) {
    text = e.tagName === 'SELECT' ? (e.selectedOptions[0]?.text || '') : e.value;
    if (!text && e.placeholder) {
      text = e.placeholder;
      colour = getComputedStyle(e, '::placeholder').color;
    }
  }
  if (!text) continue;
  found.push({where: where(e), text: text.slice(0, 40), colour: rgba(colour), opacity: opacity(e),
              size_px: parseFloat(style.fontSize), weight: Number(style.fontWeight), ...backgrounds(e)});
}
return found;
"""
)

CONTROLS_JS = (
    COLOUR_JS
    + """
const root = document.querySelector(arguments[0]);
const found = [];
const selector = 'input:not([type=checkbox]):not([type=radio]):not([type=hidden]), textarea, select, button';
for (const e of root.querySelectorAll(selector)) {
  if (!shown(e) || e.disabled) continue;
  const style = getComputedStyle(e);
  const border = parseFloat(style.borderTopWidth) >= 1 && style.borderTopStyle !== 'none'
    ? rgba(style.borderTopColor) : null;
  found.push({where: where(e), border, fill: rgba(style.backgroundColor), outside: backgrounds(e.parentElement)});
}
return found;
"""
)

FOCUS_JS = (
    COLOUR_JS
    + """
const e = document.activeElement;
if (!e || e === document.body) return null;
const style = getComputedStyle(e);
// An outline with a non-negative offset is drawn on what lies around the element, a negative one on the element.
const offset = parseFloat(style.outlineOffset) || 0;
return {where: where(e), id: e.id, focus_visible: e.matches(':focus-visible'), style: style.outlineStyle,
        width_px: parseFloat(style.outlineWidth) || 0, colour: rgba(style.outlineColor),
        ...backgrounds(offset >= 0 ? e.parentElement : e)};
"""
)


@dataclass(frozen=True)
class TextContrast:
    where: str
    text: str
    colour: Rgba
    background: Rgba | None  # None when a background image lies under the text
    image: str | None
    size_px: float
    weight: float

    @property
    def large(self) -> bool:
        return self.size_px >= LARGE_TEXT_PX or (self.size_px >= LARGE_BOLD_TEXT_PX and self.weight >= BOLD_WEIGHT)

    @property
    def required(self) -> float:
        return LARGE_TEXT_MIN_RATIO if self.large else TEXT_MIN_RATIO

    @property
    def ratio(self) -> float:
        return 0.0 if self.background is None else contrast_ratio(self.colour.over(self.background), self.background)

    def __str__(self) -> str:
        under = f"an image at {self.image}" if self.image else str(self.background)
        return (f"{self.where} {self.text!r}: {self.colour} on {under} = {self.ratio:.2f}:1, "
                f"needs {self.required}:1 ({self.size_px:g}px/{self.weight:g})")  # fmt: skip


def text_contrasts(driver: Any, root: str = "body") -> list[TextContrast]:
    """Every visible text under `root` (placeholders and control values included) against its background."""
    found = []
    for item in driver.execute_script(TEXTS_JS, root):
        layers = [Rgba.of(layer) for layer in item["layers"]]
        found.append(TextContrast(
            where=item["where"], text=item["text"], colour=Rgba.of(item["colour"]).faded(item["opacity"]),
            background=None if item["image"] else flatten(layers), image=item["image"],
            size_px=item["size_px"], weight=item["weight"],
        ))  # fmt: skip
    return found


@dataclass(frozen=True)
class ControlContrast:
    """What tells a control from its surroundings: its border or its fill, whichever contrasts more."""

    where: str
    border: Rgba | None
    fill: Rgba
    outside: Rgba

    @property
    def ratio(self) -> float:
        fill = self.fill.over(self.outside)
        candidates = [contrast_ratio(fill, self.outside)]
        if self.border is not None:
            candidates.append(contrast_ratio(self.border.over(fill), self.outside))
        return max(candidates)

    def __str__(self) -> str:
        return f"{self.where}: border {self.border}, fill {self.fill} on {self.outside} = {self.ratio:.2f}:1"


def control_contrasts(driver: Any, root: str = "body") -> list[ControlContrast]:
    found = []
    for item in driver.execute_script(CONTROLS_JS, root):
        outside = item["outside"]
        assert outside["image"] is None, f"{item['where']} sits on a background image at {outside['image']}"
        found.append(ControlContrast(
            where=item["where"], border=item["border"] and Rgba.of(item["border"]), fill=Rgba.of(item["fill"]),
            outside=flatten([Rgba.of(layer) for layer in outside["layers"]]),
        ))  # fmt: skip
    return found


@dataclass(frozen=True)
class FocusRing:
    where: str
    element_id: str
    focus_visible: bool
    style: str
    width_px: float
    colour: Rgba
    background: Rgba

    @property
    def ratio(self) -> float:
        return contrast_ratio(self.colour.over(self.background), self.background)

    @property
    def visible(self) -> bool:
        return self.focus_visible and self.style != "none" and self.width_px >= 2 and self.ratio >= NON_TEXT_MIN_RATIO

    def __str__(self) -> str:
        return (f"{self.where}: focus-visible={self.focus_visible}, outline {self.style} {self.width_px:g}px "
                f"{self.colour} on {self.background} = {self.ratio:.2f}:1")  # fmt: skip


def focus_ring(driver: Any) -> FocusRing | None:
    """The focused element's outline, measured against what it is drawn on; None when nothing has focus."""
    item = driver.execute_script(FOCUS_JS)
    if item is None:
        return None
    assert item["image"] is None, f"the focus ring of {item['where']} is drawn on an image at {item['image']}"
    return FocusRing(
        where=item["where"], element_id=item["id"], focus_visible=item["focus_visible"], style=item["style"],
        width_px=item["width_px"], colour=Rgba.of(item["colour"]),
        background=flatten([Rgba.of(layer) for layer in item["layers"]]),
    )  # fmt: skip


def set_colour_scheme(driver: Any, scheme: str | None) -> None:
    """Emulate `prefers-color-scheme` (light or dark) as the OS setting would; None ends the emulation."""
    features = [] if scheme is None else [{"name": "prefers-color-scheme", "value": scheme}]
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "", "features": features})


# Tab stops: what the page says should be reachable (enabled, shown, not taken out of the order) and a
# description of an element that both lists use.
TABBABLE_JS = """
const selector = 'a[href], button, input, select, textarea, summary, [tabindex]';
return [...document.querySelectorAll(selector)].filter((e) => e.tabIndex >= 0 && !e.disabled && !e.inert
  && !e.closest('[inert], dialog:not([open])') && e.checkVisibility({visibilityProperty: true}))
  .map((e) => e.id || e.tagName.toLowerCase() + (e.className ? '.' + e.className.split(' ').join('.') : ''));
"""
ACTIVE_JS = """
const e = document.activeElement;
if (!e || e === document.body) return null;
return e.id || e.tagName.toLowerCase() + (e.className ? '.' + e.className.split(' ').join('.') : '');
"""


def tabbable(driver: Any) -> list[str]:
    return driver.execute_script(TABBABLE_JS)  # type: ignore[no-any-return]


def active_element(driver: Any) -> str | None:
    return driver.execute_script(ACTIVE_JS)  # type: ignore[no-any-return]


@dataclass
class AXNode:
    """One node of chromium's accessibility tree: what a screen reader is given."""

    node_id: str
    role: str
    name: str
    description: str
    ignored: bool
    properties: dict[str, Any]
    backend_id: int | None
    parent: AXNode | None = None
    children: list[AXNode] = field(default_factory=list)

    def ancestors(self) -> Iterator[AXNode]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def walk(self) -> Iterator[AXNode]:
        """This node and its descendants in document (reading) order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def text(self) -> str:
        """The text a screen reader reads inside this node: its static text, in order."""
        return "".join(node.name for node in self.walk() if node.role == "StaticText" and not node.ignored)


def _value(entry: dict[str, Any] | None) -> Any:
    return None if entry is None else entry.get("value")


class AXTree:
    """Accessibility.getFullAXTree as a tree, with a way from a DOM element to its node."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        raw = driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
        self.nodes: dict[str, AXNode] = {}
        for item in raw:
            self.nodes[item["nodeId"]] = AXNode(
                node_id=item["nodeId"], role=str(_value(item.get("role")) or ""),
                name=str(_value(item.get("name")) or ""), description=str(_value(item.get("description")) or ""),
                ignored=bool(item.get("ignored")),
                properties={p["name"]: _value(p.get("value")) for p in item.get("properties", [])},
                backend_id=item.get("backendDOMNodeId"),
            )  # fmt: skip
        for item in raw:
            node = self.nodes[item["nodeId"]]
            for child_id in item.get("childIds", []):
                child = self.nodes.get(child_id)
                if child is not None:
                    child.parent = node
                    node.children.append(child)
        self.root = next(node for node in self.nodes.values() if node.parent is None)
        self._by_backend = {node.backend_id: node for node in self.nodes.values() if node.backend_id is not None}

    def exposed(self) -> Iterator[AXNode]:
        """The nodes a screen reader can reach, in reading order."""
        return (node for node in self.root.walk() if not node.ignored)

    def find(self, selector: str) -> AXNode | None:
        """The node of the DOM element `selector` picks; None when chromium left the element out of the tree
        (as it does with what an open modal dialog makes inert)."""
        document = self.driver.execute_cdp_cmd("DOM.getDocument", {"depth": 0})
        found = self.driver.execute_cdp_cmd(
            "DOM.querySelector", {"nodeId": document["root"]["nodeId"], "selector": selector}
        )
        assert found["nodeId"], f"no element {selector!r}"
        element = self.driver.execute_cdp_cmd("DOM.describeNode", {"nodeId": found["nodeId"]})["node"]
        return self._by_backend.get(element["backendNodeId"])

    def of(self, selector: str) -> AXNode:
        node = self.find(selector)
        assert node is not None, f"{selector!r} has no node in the accessibility tree"
        return node

    def describe(self, node: AXNode) -> str:
        """The DOM element behind a node, for messages: tag, id and classes."""
        if node.backend_id is None:
            return f"{node.role} {node.name!r}"
        element = self.driver.execute_cdp_cmd("DOM.describeNode", {"backendNodeId": node.backend_id})["node"]
        attributes = dict(zip(element.get("attributes", [])[::2], element.get("attributes", [])[1::2], strict=True))
        return f"<{element['localName']} id={attributes.get('id')!r} class={attributes.get('class')!r}>"


def run_axe(driver: Any) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.x A/AA and best-practice violations on the page as it stands, from the local copy.

    Injected through the driver (as a browser extension would), so the page's own Content-Security-Policy and
    its no-dependency rule are untouched.
    """
    driver.execute_script(AXE_PATH.read_text(encoding="utf-8"))
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: arguments[0]}, resultTypes: ['violations']})"
        ".then((r) => done(JSON.stringify({passed: r.passes.length, violations: r.violations.map((v) => ({"
        "  id: v.id, impact: v.impact, help: v.help,"
        "  nodes: v.nodes.map((n) => n.target.join(' ') + ': ' + n.failureSummary)}))})),"
        "      (e) => done(JSON.stringify({error: String(e)})));",
        ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"],
    )
    outcome = json.loads(result)
    print(f"axe-core: {outcome['passed']} rules passed, {len(outcome['violations'])} violated")
    assert "error" not in outcome, f"axe-core failed: {outcome['error']}"
    # A run that checked next to nothing (the page not drawn yet) would find nothing wrong either.
    assert outcome["passed"] >= AXE_MIN_RULES_PASSED, f"axe-core passed only {outcome['passed']} rules"
    return outcome["violations"]  # type: ignore[no-any-return]
