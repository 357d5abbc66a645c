// The study page's film viewer: the radiograph's own values windowed here (window/level),
// zoom and pan, the lung contours on or off; one per image, side by side.
//
// Served by /studies/<uid>/view/<sop>/: view.json (size, value range, the header's window
// or the 0.5-99.5 percentile one, inversion), pixels (the Modality LUT values as uint16
// codes spanning [low, high], little-endian, gzip on the wire) and lungs.png (the contours
// on a transparent layer of the same size). No inline script: the Content-Security-Policy
// allows scripts from this origin only.
//
// Mouse: drag to pan, wheel to zoom about the pointer, right-drag or shift-drag for
// window (left-right) and level (up-down), double-click to reset.
"use strict";

(function () {
  function setup(root) {
    const base = root.dataset.base;
    const canvas = root.querySelector("canvas");
    const context = canvas.getContext("2d");
    const readout = root.querySelector(".viewer-readout");
    const film = document.createElement("canvas");
    const state = { zoom: 1, x: 0, y: 0, lungs: true, invert: false, center: 0, width: 1 };
    const lut = new Uint8ClampedArray(65536);
    let meta = null;
    let codes = null;
    let lungs = null;
    let image = null;
    let filmDirty = true;
    let pending = false;

    function fail(reason) {
      root.classList.add("failed");
      readout.textContent = "viewer not available (" + reason + "); the static picture is below";
    }

    function windowFilm() {
      // One table over the 65,536 codes, then one lookup a pixel.
      const step = (meta.high - meta.low) / 65535;
      const bottom = state.center - state.width / 2;
      const flip = meta.inverted !== state.invert;
      for (let code = 0; code < 65536; code++) {
        let shown = (meta.low + code * step - bottom) / state.width;
        shown = shown < 0 ? 0 : shown > 1 ? 1 : shown;
        lut[code] = Math.round((flip ? 1 - shown : shown) * 255);
      }
      const data = image.data;
      for (let i = 0, j = 0; i < codes.length; i++, j += 4) {
        const grey = lut[codes[i]];
        data[j] = grey;
        data[j + 1] = grey;
        data[j + 2] = grey;
        data[j + 3] = 255;
      }
      film.getContext("2d").putImageData(image, 0, 0);
      filmDirty = false;
    }

    function placement() {
      const fit = Math.min(canvas.width / meta.width, canvas.height / meta.height);
      const scale = fit * state.zoom;
      return {
        scale: scale,
        left: (canvas.width - meta.width * scale) / 2 + state.x,
        top: (canvas.height - meta.height * scale) / 2 + state.y,
      };
    }

    function draw() {
      pending = false;
      if (filmDirty) windowFilm();
      const at = placement();
      context.setTransform(1, 0, 0, 1, 0, 0);
      context.fillStyle = "#000";
      context.fillRect(0, 0, canvas.width, canvas.height);
      context.imageSmoothingEnabled = state.zoom < 3;
      const width = meta.width * at.scale;
      const height = meta.height * at.scale;
      context.drawImage(film, at.left, at.top, width, height);
      if (state.lungs) context.drawImage(lungs, at.left, at.top, width, height);
      readout.textContent =
        "W " + Math.round(state.width) + " / L " + Math.round(state.center) +
        " · " + state.zoom.toFixed(1) + "x" + (state.invert ? " · inverted" : "") +
        " · default window: " + meta.window_source;
      // For whoever tests the page: what is shown now.
      root.dataset.state = JSON.stringify(state);
    }

    function redraw(newWindow) {
      if (newWindow) filmDirty = true;
      if (!pending) {
        pending = true;
        window.requestAnimationFrame(draw);
      }
    }

    function headerWindow() {
      state.center = meta.window.center;
      state.width = meta.window.width;
    }

    function reset() {
      state.zoom = 1;
      state.x = 0;
      state.y = 0;
      state.invert = false;
      headerWindow();
      redraw(true);
    }

    const actions = {
      lungs: function (button) {
        state.lungs = !state.lungs;
        button.setAttribute("aria-pressed", String(state.lungs));
        redraw(false);
      },
      header: function () {
        headerWindow();
        redraw(true);
      },
      full: function () {
        state.center = (meta.percentile.low + meta.percentile.high) / 2;
        state.width = Math.max(1, meta.percentile.high - meta.percentile.low);
        redraw(true);
      },
      invert: function (button) {
        state.invert = !state.invert;
        button.setAttribute("aria-pressed", String(state.invert));
        redraw(true);
      },
      reset: reset,
    };
    root.querySelectorAll("button[data-action]").forEach(function (button) {
      button.addEventListener("click", function () {
        if (meta) actions[button.dataset.action](button);
      });
    });

    canvas.addEventListener("wheel", function (event) {
      if (!meta) return;
      event.preventDefault();
      const box = canvas.getBoundingClientRect();
      const px = (event.clientX - box.left) * (canvas.width / box.width);
      const py = (event.clientY - box.top) * (canvas.height / box.height);
      const before = placement();
      const ix = (px - before.left) / before.scale;
      const iy = (py - before.top) / before.scale;
      const factor = event.deltaY < 0 ? 1.25 : 0.8;
      state.zoom = Math.min(16, Math.max(0.5, state.zoom * factor));
      const fit = Math.min(canvas.width / meta.width, canvas.height / meta.height);
      const scale = fit * state.zoom;
      // Keep the point under the pointer where it was.
      state.x = px - ix * scale - (canvas.width - meta.width * scale) / 2;
      state.y = py - iy * scale - (canvas.height - meta.height * scale) / 2;
      redraw(false);
    }, { passive: false });

    let drag = null;
    canvas.addEventListener("contextmenu", function (event) {
      event.preventDefault();
    });
    canvas.addEventListener("pointerdown", function (event) {
      if (!meta) return;
      canvas.setPointerCapture(event.pointerId);
      drag = {
        mode: event.button === 2 || event.shiftKey ? "window" : "pan",
        x: event.clientX,
        y: event.clientY,
        state: Object.assign({}, state),
      };
    });
    canvas.addEventListener("pointermove", function (event) {
      if (!drag) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      if (drag.mode === "pan") {
        const box = canvas.getBoundingClientRect();
        state.x = drag.state.x + dx * (canvas.width / box.width);
        state.y = drag.state.y + dy * (canvas.height / box.height);
        redraw(false);
      } else {
        // The whole value range over the canvas's width (window) and height (level).
        const range = meta.high - meta.low;
        state.width = Math.max(1, drag.state.width + (dx * range) / canvas.width);
        state.center = drag.state.center - (dy * range) / canvas.height;
        redraw(true);
      }
    });
    function release(event) {
      if (drag && canvas.hasPointerCapture(event.pointerId)) {
        canvas.releasePointerCapture(event.pointerId);
      }
      drag = null;
    }
    canvas.addEventListener("pointerup", release);
    canvas.addEventListener("pointercancel", release);
    canvas.addEventListener("dblclick", function () {
      if (meta) reset();
    });

    function load(url, kind) {
      return fetch(url, { credentials: "same-origin" }).then(function (answer) {
        if (!answer.ok) throw new Error("HTTP " + answer.status);
        return kind === "json" ? answer.json() : answer.arrayBuffer();
      });
    }
    const picture = new Promise(function (resolve, reject) {
      const layer = new Image();
      layer.onload = function () { resolve(layer); };
      layer.onerror = function () { reject(new Error("lung layer")); };
      layer.src = base + "lungs.png";
    });
    Promise.all([load(base + "view.json", "json"), load(base + "pixels", "bytes"), picture])
      .then(function (parts) {
        meta = parts[0];
        codes = new Uint16Array(parts[1]); // little-endian, as every browser's platform
        lungs = parts[2];
        if (codes.length !== meta.width * meta.height) throw new Error("size mismatch");
        film.width = meta.width;
        film.height = meta.height;
        image = film.getContext("2d").createImageData(meta.width, meta.height);
        reset();
        root.classList.add("ready");
      })
      .catch(function (error) {
        fail(error.message);
      });
  }

  document.querySelectorAll(".viewer[data-base]").forEach(setup);
})();
