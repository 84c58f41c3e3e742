"""The on-device latency harness.

- ``runner.py`` runs ON the device (standard library + numpy + one runtime; copied there as a single file).
- ``remote.py`` deploys a bundle and the runner (``local``, ``ssh://``, ``adb://``) and fetches the results.
- ``report.py`` turns many result JSONs (schema ``edgepipe.bench/1``, see SCHEMA.md) into one comparison.

Nothing is imported here, so ``import edgepipe.harness.runner`` stays free of edgepipe's other dependencies.
"""
