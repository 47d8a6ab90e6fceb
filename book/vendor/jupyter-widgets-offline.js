// Loaded on every page with widgets, right before embed-amd.js (see nb_ipywidgets_js in
// book/_config.yml); copied next to embed-amd.js by scripts/build_book.py. Two fixes:
(function () {
  "use strict";

  // 1. embed-amd.js defines named AMD modules and takes each module's webpack public path (where
  //    its CSS finds the Font Awesome fonts) from the module's require.js URL, by default
  //    <page folder>/@jupyter-widgets/html-manager/dist/ (404). Map the modules to embed-amd.js
  //    itself, next to which the fonts sit. (Runs after require.js, before embed-amd.js.)
  var here = new URL(".", document.currentScript.src).href;
  var paths = {};
  ["@jupyter-widgets/html-manager/dist/libembed-amd", "@jupyter-widgets/html-manager",
   "@jupyter-widgets/base", "@jupyter-widgets/base7", "@jupyter-widgets/controls",
   "@jupyter-widgets/controls7"].forEach(function (id) { paths[id] = here + "embed-amd"; });
  window.requirejs.config({ paths: paths });
  window.__jupyter_widgets_assets_path__ = here;

  // 2. ipywidgets 8 typesets widget labels with the MathJax 2 API,
  //    `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`, whenever `window.MathJax` exists;
  //    Sphinx loads MathJax 3, which has no `Hub`, so every label would throw. Give whatever object
  //    becomes `window.MathJax` (the config object, then MathJax 3 itself) a `Hub.Queue` that
  //    forwards to MathJax 3's `typesetPromise`.
  function addHub(mathjax) {
    if (mathjax && typeof mathjax === "object" && !mathjax.Hub) {
      mathjax.Hub = {
        Queue: function () {
          for (var i = 0; i < arguments.length; i++) {
            var call = arguments[i];
            if (Array.isArray(call) && call[0] === "Typeset" && window.MathJax.typesetPromise) {
              window.MathJax.typesetPromise([call[2]]).catch(function () {});
            }
          }
        },
      };
    }
    return mathjax;
  }
  var current = addHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = addHub(value); },
  });
})();
