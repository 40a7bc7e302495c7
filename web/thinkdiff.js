// Shows ThinkDiff Reason's answer (the VLM's text) on the node after it runs.
// Only the frontend's public extension API: app.registerExtension and node.addDOMWidget.
import { app } from "../../scripts/app.js";

const NODE = "ThinkDiffReason";
const WIDGET = "vlm_answer";
// Most of a 128-token answer (~8 lines); fixed, so the words and instruction boxes keep the rest.
const ANSWER_HEIGHT = 140;

function answerWidget(node) {
  return node.widgets?.find((w) => w.name === WIDGET);
}

function addAnswerWidget(node) {
  const textBox = document.createElement("textarea");
  textBox.className = "comfy-multiline-input"; // the frontend's style for text boxes
  textBox.readOnly = true;
  textBox.style.opacity = 0.7;
  // Its own type: "customtext" would make the frontend treat it as an editable prompt box.
  const widget = node.addDOMWidget(WIDGET, "thinkdiff_answer", textBox, {
    getValue: () => textBox.value,
    setValue: (text) => { textBox.value = text; },
    getMinHeight: () => ANSWER_HEIGHT,
    getMaxHeight: () => ANSWER_HEIGHT,
    serialize: false, // not in the API prompt
  });
  widget.serialize = false; // not in widgets_values, so saved workflows keep INPUT_TYPES' layout
  // Grow the node by the box: sharing the old height would squeeze the instruction box to ~2 lines.
  node.setSize([node.size[0], Math.max(node.size[1] + ANSWER_HEIGHT, node.computeSize()[1])]);
  return widget;
}

app.registerExtension({
  name: "ThinkDiff.ShowAnswer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const { onExecuted, onSerialize } = nodeType.prototype;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!message?.text?.length) return;
      const widget = answerWidget(this) ?? addAnswerWidget(this);
      widget.value = message.text.join("\n");
      this.setDirtyCanvas?.(true, true);
    };
    // A saved or copied node has no answer box, so it is saved without the box's height: otherwise each
    // save, reload and run would grow it again.
    nodeType.prototype.onSerialize = function (data) {
      onSerialize?.apply(this, arguments);
      if (answerWidget(this)) data.size = [data.size[0], data.size[1] - ANSWER_HEIGHT];
    };
  },
});
