// Shows ThinkDiff Reason's answer (the VLM's text) on the node after it runs.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "ThinkDiffReason";
const WIDGET = "vlm_answer";
// Tall enough for most of a 128-token answer (~8 lines); a text box's default shows about 3.
const ANSWER_MIN_HEIGHT = 140;

function showAnswer(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    // A multiline STRING widget is a text box that wraps the whole answer (a canvas "text" widget
    // would draw one truncated line).
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never part of widgets_values, so saved workflows keep INPUT_TYPES' layout
    widget.options = { ...widget.options, serialize: false, getMinHeight: () => ANSWER_MIN_HEIGHT };
    // The text box is widget.element; frontend 1.49 warns that widget.inputEl, the same box, is deprecated.
    const textBox = widget.element ?? widget.inputEl;
    if (textBox) {
      textBox.readOnly = true;
      textBox.style.opacity = 0.7;
    }
    node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ThinkDiff.ShowAnswer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showAnswer(this, message.text.join("\n"));
    };
  },
});
