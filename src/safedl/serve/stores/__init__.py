"""Where the service's shared state lives, through SQLAlchemy Core: ``engine`` (a PATH_OR_URL -> an Engine: a SQLite
file for one host, PostgreSQL for workers and replicas), ``schema`` (the tables of every store), ``migrate`` (schema
creation on an empty database, the revision check, ``safedl db upgrade``) and ``sqlite`` (the SQLite connection
settings). The stores themselves (serve/keys.py, limits.py, audit.py, swap.py, monitor/store.py) use these."""
