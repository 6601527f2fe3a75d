// The page: an image and a task prompt go to this server's POST /v1/paligemma (stream=true); the answer streams
// back as Server-Sent Events, then the command line's JSON record, whose detections or segments are drawn over
// the image. It talks to nothing but the server that served it.
"use strict";

const COLOURS = ["#4285f4", "#db4437", "#f4b400", "#0f9d58", "#e48ef1"]; // big_vision's, in turn
const $ = (id) => document.getElementById(id);
const page = { image: null, url: null, record: null, controller: null, stopped: false };

// --- The API key: asked once, kept for this tab only (sessionStorage), sent as a header, never in a URL.
function headers() {
  const key = sessionStorage.getItem("paligemma-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("paligemma-key", $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  hideError();
  watchHealth();
});

// --- Errors: one readable line, from the server's OpenAI-style body where there is one.
function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

async function errorLine(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error.message;
  } catch {
    // not the server's JSON error (a proxy's page, say): the status alone
  }
  return `Error ${response.status}: ${message}`;
}

// --- The server's state: loading (503), ready, or asking for a key.
async function watchHealth() {
  for (;;) {
    try {
      const health = await fetch("/health");
      if (health.ok) {
        const models = await fetch("/v1/models", { headers: headers() });
        if (models.status === 401) {
          $("status").textContent = "needs an API key";
          askForKey();
          return;
        }
        $("status").textContent = models.ok ? `ready: ${(await models.json()).data[0].id}` : "ready";
        $("run").disabled = false;
        return;
      }
      $("status").textContent = health.status === 503 ? "loading the model…" : `not ready (${health.status})`;
    } catch {
      $("status").textContent = "cannot reach the server";
    }
    await new Promise((done) => setTimeout(done, 2000));
  }
}

// --- The image: dropped, pasted or chosen; shown at once, scaled for display only.
function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name || "That"} is not an image (${file.type || "unknown type"})`);
    return;
  }
  hideError();
  if (page.controller) stop(); // an answer about the previous image is no answer about this one
  if (page.url) URL.revokeObjectURL(page.url);
  page.image = file;
  page.url = URL.createObjectURL(file);
  clearAnswer();
  $("picture").src = page.url;
  $("frame").hidden = false;
}

$("file").addEventListener("change", () => setImage($("file").files[0]));
$("picture").addEventListener("error", () => {
  $("frame").hidden = true; // the browser cannot show it; the server still gets it and says what is wrong
});
$("drop").addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  setImage(event.dataTransfer.files[0]);
});
$("drop").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    $("file").click();
  }
});
for (const name of ["dragover", "drop"]) {
  document.addEventListener(name, (event) => event.preventDefault()); // a file dropped beside the zone: not opened
}
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) setImage(item.getAsFile());
});

// --- The prompt: built from the task, the language and the question or objects; editable as sent.
function updatePrompt() {
  const template = $("task").value;
  $("lang-field").hidden = !template.includes("{lang}");
  $("question-field").hidden = !template.includes("{question}");
  $("objects-field").hidden = !template.includes("{objects}");
  $("prompt").value = template
    .replace("{lang}", $("lang").value)
    .replace("{question}", $("question").value.trim())
    .replace("{objects}", $("objects").value.trim());
}

for (const id of ["task", "lang", "question", "objects"]) {
  for (const name of ["input", "change"]) $(id).addEventListener(name, updatePrompt);
}

// --- Asking: a multipart form with the image's own bytes; the answer read as Server-Sent Events.
function form() {
  const body = new FormData();
  body.append("image", page.image, page.image.name || "pasted-image");
  body.append("prompt", $("prompt").value);
  body.append("max_tokens_to_generate", $("max-tokens").value);
  body.append("do_sample", $("sample").checked ? "true" : "false");
  if ($("sample").checked) {
    body.append("temperature", $("temperature").value);
    body.append("top_p", $("top-p").value);
    if ($("seed").value !== "") body.append("seed", $("seed").value);
  }
  body.append("stream", "true");
  return body;
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, ""));
      buffer = buffer.slice(end + 2);
      if (data.join("\n") === "[DONE]") return;
      if (data.length) yield JSON.parse(data.join("\n"));
    }
  }
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!page.image) {
    showError("Choose an image first");
    return;
  }
  hideError();
  clearAnswer();
  page.controller = new AbortController();
  page.stopped = false;
  $("run").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "waiting for the first token…";
  try {
    const response = await fetch("/v1/paligemma", {
      method: "POST", body: form(), headers: headers(), signal: page.controller.signal,
    });
    if (!response.ok) {
      showError(await errorLine(response));
      if (response.status === 401) askForKey();
      $("stats").textContent = "";
      return;
    }
    for await (const message of events(response)) {
      if (message.error) throw new Error(`Error: ${message.error.message}`);
      if (message.text !== undefined) $("answer").textContent += message.text;
      if (message.record) finish(message.record);
    }
    if (!page.record) throw new Error("Error: the answer ended before it was complete");
  } catch (error) {
    if (page.stopped) {
      $("stats").textContent = "stopped";
    } else {
      showError(error.message.startsWith("Error") ? error.message : `Error: the server did not answer (${error.message})`);
      $("stats").textContent = "";
    }
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
  }
});

function stop() {
  page.stopped = true;
  page.controller.abort(); // the server sees the connection close and frees the row
}

$("stop").addEventListener("click", stop);

function finish(record) {
  page.record = record;
  $("answer").textContent = record.text;
  const t = record.timings;
  const rate = t.decode_s > 0 ? `, ${(t.decode_tokens / t.decode_s).toFixed(1)} tokens/s` : "";
  $("stats").textContent = `first token ${t.first_token_s.toFixed(2)} s${rate}, ${record.token_ids.length} tokens`;
  draw(record.detections || record.segments || []);
  $("save-json").disabled = false;
  $("save-png").disabled = false;
}

function clearAnswer() {
  page.record = null;
  $("answer").textContent = "";
  $("stats").textContent = "";
  $("save-json").disabled = true;
  $("save-png").disabled = true;
  draw([]);
}

// --- Objects: boxes in percent of the image (so they scale with it), masks on a canvas of the image's size.
function draw(objects) {
  const image = $("picture");
  const [width, height] = [image.naturalWidth, image.naturalHeight];
  const boxes = $("boxes");
  const list = $("objects-list");
  boxes.replaceChildren();
  list.replaceChildren();
  const canvas = $("masks");
  canvas.width = width || 1;
  canvas.height = height || 1;
  const context = canvas.getContext("2d");
  objects.forEach((object, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const [x0, y0, x1, y1] = object.box;
    const box = document.createElement("div");
    box.className = "box";
    box.style.setProperty("--colour", colour);
    box.style.left = `${(100 * x0) / width}%`;
    box.style.top = `${(100 * y0) / height}%`;
    box.style.width = `${(100 * (x1 - x0)) / width}%`;
    box.style.height = `${(100 * (y1 - y0)) / height}%`;
    const tag = document.createElement("span");
    tag.textContent = caption(object);
    box.append(tag);
    boxes.append(box);
    if (object.mask) paintMask(context, object.mask, colour);

    const item = document.createElement("li");
    item.tabIndex = 0;
    item.style.setProperty("--colour", colour);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    item.append(swatch, caption(object));
    const hot = (on) => [box, item].forEach((e) => e.classList.toggle("hot", on));
    for (const [name, on] of [["mouseenter", true], ["mouseleave", false], ["focus", true], ["blur", false]]) {
      item.addEventListener(name, () => hot(on));
    }
    list.append(item);
  });
}

function caption(object) {
  const score = object.score === null ? "" : ` ${object.score.toFixed(2)}`;
  return `${object.label || "(no label)"}${score}`;
}

// COCO's compressed run-length encoding (pycocotools' text form): runs of 0s and 1s down the columns.
function rleCounts(text) {
  const counts = [];
  for (let p = 0; p < text.length;) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p++) - 48;
      x |= (c & 0x1f) << (5 * k++);
      more = (c & 0x20) !== 0;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function paintMask(context, mask, colour) {
  const [height, width] = mask.size;
  const pixels = context.getImageData(0, 0, width, height);
  const words = new Uint32Array(pixels.data.buffer); // a pixel each, whatever the byte order
  const rgba = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16)).concat(128); // half opaque, as --annotate
  const paint = new Uint32Array(new Uint8ClampedArray(rgba).buffer)[0];
  let at = 0;
  rleCounts(mask.counts).forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = at; j < at + run; j++) words[(j % height) * width + Math.floor(j / height)] = paint; // down columns
    }
    at += run;
  });
  context.putImageData(pixels, 0, 0);
}

// --- Downloads: the record as the command line writes it, and the picture with its boxes and masks.
function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

$("save-json").addEventListener("click", () => {
  save(new Blob([JSON.stringify(page.record)], { type: "application/json" }), "paligemma.json");
});

$("save-png").addEventListener("click", () => {
  const image = $("picture");
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  context.drawImage($("masks"), 0, 0);
  const line = Math.max(2, Math.round(canvas.width / 300));
  context.font = `${6 * line + 4}px sans-serif`;
  context.textBaseline = "bottom";
  (page.record.detections || page.record.segments || []).forEach((object, i) => {
    const [x0, y0, x1, y1] = object.box;
    context.strokeStyle = context.fillStyle = COLOURS[i % COLOURS.length];
    context.lineWidth = line;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = caption(object);
    const size = context.measureText(text);
    const top = Math.max(y0, 6 * line + 8);
    context.fillRect(x0, top - 6 * line - 8, size.width + 8, 6 * line + 8);
    context.fillStyle = "#fff";
    context.fillText(text, x0 + 4, top - 2);
  });
  canvas.toBlob((blob) => save(blob, "paligemma.png"), "image/png");
});

updatePrompt();
watchHealth();
