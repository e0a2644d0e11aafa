// The case page as a reading station: zoom and pan of the stored image, the overlay toggle and
// single-key shortcuts. The page works without this file: the links, the access keys, the
// overlay's checkbox (CSS) and the "Full image" link do the same with a modifier or a click.
"use strict";

(function () {
  document.documentElement.classList.add("js");
  for (const hidden of document.querySelectorAll(".zoom-tools, .js-hint")) {
    hidden.hidden = false;
  }

  const viewer = document.getElementById("viewer");
  const stage = document.getElementById("stage");
  const lesion = document.getElementById("lesion");
  const level = document.getElementById("zoom-level");
  // The view: scale 1 shows the whole image in the viewer; (x, y) is the stage's offset in
  // screen pixels.
  const view = { scale: 1, x: 0, y: 0 };

  function largestScale() {
    // At least 8x, and always enough for one stored pixel per screen pixel, twice over.
    if (!lesion || !lesion.naturalWidth || !lesion.clientWidth) return 8;
    return Math.max(8, 2 * lesion.naturalWidth / lesion.clientWidth);
  }

  function apply() {
    if (!stage) return;
    const width = viewer.clientWidth, height = viewer.clientHeight;
    // Keep the image inside the viewer: no empty space dragged into view.
    view.x = Math.min(0, Math.max(width - width * view.scale, view.x));
    view.y = Math.min(0, Math.max(height - height * view.scale, view.y));
    stage.style.transform = "translate(" + view.x + "px, " + view.y + "px) scale(" + view.scale + ")";
    viewer.dataset.scale = view.scale.toFixed(3);
    viewer.classList.toggle("zoomed", view.scale > 1);
    if (level) level.textContent = Math.round(view.scale * 100) + "%";
  }

  function zoomTo(scale, cx, cy) {
    // Zoom around (cx, cy), in viewer pixels: the point under it stays put.
    if (!viewer || !stage) return;
    const next = Math.min(largestScale(), Math.max(1, scale));
    if (cx === undefined) { cx = viewer.clientWidth / 2; cy = viewer.clientHeight / 2; }
    view.x = cx - (cx - view.x) * next / view.scale;
    view.y = cy - (cy - view.y) * next / view.scale;
    view.scale = next;
    apply();
  }

  if (viewer && stage) {
    viewer.addEventListener("wheel", function (event) {
      event.preventDefault();
      const box = viewer.getBoundingClientRect();
      zoomTo(view.scale * Math.exp(-event.deltaY / 300), event.clientX - box.left, event.clientY - box.top);
    }, { passive: false });

    let drag = null;
    viewer.addEventListener("pointerdown", function (event) {
      if (event.button !== 0) return;
      drag = { id: event.pointerId, x: event.clientX - view.x, y: event.clientY - view.y };
      viewer.setPointerCapture(event.pointerId);
      viewer.classList.add("dragging");
    });
    viewer.addEventListener("pointermove", function (event) {
      if (!drag || drag.id !== event.pointerId) return;
      view.x = event.clientX - drag.x;
      view.y = event.clientY - drag.y;
      apply();
    });
    const release = function () { drag = null; viewer.classList.remove("dragging"); };
    viewer.addEventListener("pointerup", release);
    viewer.addEventListener("pointercancel", release);
    viewer.addEventListener("dblclick", function (event) {
      const box = viewer.getBoundingClientRect();
      zoomTo(view.scale * 2, event.clientX - box.left, event.clientY - box.top);
    });

    const click = function (id, action) {
      const button = document.getElementById(id);
      if (button) button.addEventListener("click", action);
    };
    click("zoom-in", function () { zoomTo(view.scale * 1.5); });
    click("zoom-out", function () { zoomTo(view.scale / 1.5); });
    click("zoom-fit", function () { view.x = 0; view.y = 0; zoomTo(1); });
    click("zoom-actual", function () {
      if (lesion.naturalWidth && lesion.clientWidth) zoomTo(lesion.naturalWidth / lesion.clientWidth);
    });
    window.addEventListener("resize", apply);
  }

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName)
      && !(target.type === "radio" || target.type === "checkbox"));
  }

  function follow(id) {
    const link = document.getElementById(id);
    if (link) window.location.assign(link.href);
  }

  function choose(verdict) {
    const radio = document.querySelector("input[name=verdict][value=" + verdict + "]");
    if (radio) { radio.checked = true; radio.focus(); }
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    const keys = {
      j: function () { follow("next-case"); },
      k: function () { follow("previous-case"); },
      r: function () { choose("refer"); },
      b: function () { choose("benign"); },
      n: function () { choose("not_assessable"); },
      o: function () {
        const toggle = document.getElementById("overlay-toggle");
        if (toggle) toggle.checked = !toggle.checked;
      },
      s: function () {
        const save = document.getElementById("save-next");
        if (save) save.form.requestSubmit(save);
      },
      "+": function () { zoomTo(view.scale * 1.5); },
      "=": function () { zoomTo(view.scale * 1.5); },
      "-": function () { zoomTo(view.scale / 1.5); },
      "0": function () { view.x = 0; view.y = 0; zoomTo(1); },
    };
    const action = keys[event.key];
    if (action) { event.preventDefault(); action(); }
  });
})();
