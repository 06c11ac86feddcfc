"""The application built on the library: command line, report, figures, datasets and models.

* :mod:`~subriemann.app.cli`: ``subriemann run`` / ``resume`` / ``sweep``;
* :mod:`~subriemann.app.report`: the HTML report and ``summary.json``;
* :mod:`~subriemann.app.verdicts`: the predictions of docs/theory.md checked on each flow;
* :mod:`~subriemann.app.plots`: the report's figures (matplotlib);
* :mod:`~subriemann.app.plots_analysis`: figures of the analyses (critical sets, strata graphs);
* :mod:`~subriemann.app.datasets`: built-in and user datasets, the digits problem;
* :mod:`~subriemann.app.models`: model builders (``mlp:32,32``, user files);
* :mod:`~subriemann.app.sweep`: many runs on a distributed engine.

Nothing in the library imports from here.
"""
