"""The review queue of ``safedl serve --review PATH_OR_URL`` (issue 24): ``store`` (the ``review_queue`` table:
rejected inputs with their decision and label, bounded in size and age), ``export`` (labelled inputs as an
``.npz`` data set with a manifest), ``routes`` (``/review`` and its admin API), ``thumbnails``, ``cli``
(``safedl review list | show | label | export``)."""
