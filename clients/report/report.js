// Counts the images that loaded and marks the broken ones; the counts go on <body> for headless checks.
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("img"));
  var loaded = 0, failed = 0;
  images.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { loaded += 1; } else { failed += 1; img.classList.add("broken"); }
  });
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesFailed = String(failed);
  document.getElementById("image-status").textContent =
    loaded + " of " + images.length + " images loaded" + (failed ? " (" + failed + " failed)" : "");
});
