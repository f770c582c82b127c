"""Reports: self-contained HTML pages (``pages``, ``html``), PNG plots and the benchmark leaderboard."""
