// semcache admin UI: the little behaviour the pages need. No framework, no inline script (the CSP forbids it).
(function () {
  "use strict";

  // "select all" checkboxes: <input type=checkbox data-select-all="ids"> toggles every box named "ids" in its form.
  document.querySelectorAll("input[data-select-all]").forEach(function (master) {
    master.addEventListener("change", function () {
      var form = master.closest("form") || document;
      form.querySelectorAll('input[type=checkbox][name="' + master.dataset.selectAll + '"]').forEach(function (box) {
        box.checked = master.checked;
      });
    });
  });

  // Forms marked data-once are sent once: a double click must not report the same wrong answer twice.
  document.querySelectorAll("form[data-once]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.dataset.sent) { event.preventDefault(); return; }
      form.dataset.sent = "1";
    });
  });
  window.addEventListener("pageshow", function () {  // back to a page from the history: its forms work again
    document.querySelectorAll("form[data-once]").forEach(function (form) { delete form.dataset.sent; });
  });

  // Task states: every element with data-task-id is updated from /ui/tasks/<id> until the task is done.
  var FINAL = { success: true, failure: true };

  function render(el, status) {
    var badge = el.querySelector(".task-state");
    if (badge) {
      badge.className = "badge task-state " + status.state;
      badge.textContent = status.state;
    }
    var text = el.querySelector(".task-text");
    if (text) { text.textContent = status.text || status.state; }
    var bar = el.querySelector(".progress");
    if (bar) {
      var fill = bar.querySelector("span");
      var pct = 0;
      if (status.progress && status.progress.total > 0) {
        pct = Math.min(100, Math.round(100 * status.progress.done / status.progress.total));
      } else if (status.state === "success") {
        pct = 100;
      } else if (status.state === "started") {
        pct = 5;
      }
      fill.style.width = pct + "%";  // CSSOM, allowed by the style-src policy (inline style attributes are not)
      bar.classList.toggle("done", status.state === "success");
      bar.classList.toggle("failed", status.state === "failure");
    }
    el.dataset.state = status.state;
    // a flash message that follows a task turns green or red with its outcome
    if (el.classList.contains("flash") && FINAL[status.state]) {
      el.classList.add(status.state === "success" ? "ok" : "error");
    }
    // on the review page, an entry whose decision is done is greyed out: it has left the queue
    if (status.state === "success" && el.dataset.entry) {
      var item = document.getElementById("item-" + el.dataset.entry);
      if (item) { item.classList.add("decided"); }
    }
  }

  function poll(el, delay) {
    fetch("/ui/tasks/" + encodeURIComponent(el.dataset.taskId), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (status) {
        if (!status) { return; }
        render(el, status);
        if (!FINAL[status.state]) { setTimeout(function () { poll(el, Math.min(delay * 1.3, 3000)); }, delay); }
      })
      .catch(function () { setTimeout(function () { poll(el, 3000); }, 3000); });
  }

  document.querySelectorAll("[data-task-id]").forEach(function (el) {
    var badge = el.querySelector(".task-state");
    var state = badge ? badge.textContent.trim() : "";
    if (el.hasAttribute("data-task-progress") || !FINAL[state]) {
      poll(el, 400);
    } else if (state === "success" && el.dataset.entry) {
      // done between the server reading the queue and rendering the actions: grey the entry out now
      var item = document.getElementById("item-" + el.dataset.entry);
      if (item) { item.classList.add("decided"); }
    }
  });
})();
