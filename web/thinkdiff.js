// Shows ThinkDiff Reason's answer (the VLM's text) on the node after it runs.
import { app } from "../../scripts/app.js";

const NODE = "ThinkDiffReason";
const WIDGET = "vlm_answer";

function showAnswer(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = node.addWidget("text", WIDGET, "", () => {}, { multiline: true, serialize: false });
    widget.serialize = false; // never part of widgets_values, so saved workflows keep INPUT_TYPES' layout
    if (widget.inputEl) widget.inputEl.readOnly = true;
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
