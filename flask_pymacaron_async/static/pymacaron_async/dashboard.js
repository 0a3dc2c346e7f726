/* flask-pymacaron-async dashboard: refresh the live part without reloading, confirm every action.
 * No framework, no CDN. The fragment is rendered (and escaped) by the server's templates. */
(function () {
  "use strict";
  var live = document.getElementById("pma-live");
  var stamp = document.getElementById("pma-updated");
  var every = parseFloat(document.body.getAttribute("data-refresh")) * 1000;
  var busy = false;

  function show(text, stale) {
    if (!stamp) return;
    stamp.textContent = text;
    stamp.className = stale ? "pma-stale" : "pma-muted";
  }

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    var request = new XMLHttpRequest();
    request.open("GET", live.getAttribute("data-src"));
    request.setRequestHeader("X-Requested-With", "XMLHttpRequest");
    request.onload = function () {
      busy = false;
      // Only the fragment itself: never a login page the session expired into.
      if (request.status === 200 && request.getResponseHeader("X-Pma-Fragment") === "1") {
        live.innerHTML = request.responseText;
        show("updated " + new Date().toLocaleTimeString(), false);
      } else {
        show("refresh failed (HTTP " + request.status + "): reload the page", true);
      }
    };
    request.onerror = function () {
      busy = false;
      show("refresh failed: the server does not answer", true);
    };
    request.send();
  }

  // Every action form asks first; the server asks again when JavaScript is off.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (!question) return;
    if (!window.confirm(question)) {
      event.preventDefault();
      return;
    }
    var confirmed = form.querySelector("input[name=confirmed]");
    if (confirmed) confirmed.value = "1";
  });

  if (live && every > 0) {
    show("updated " + new Date().toLocaleTimeString(), false);
    window.setInterval(refresh, every);
  }
})();
