"""The HDF5 feature cache: the only package that imports h5py.

``cache`` is the schema, the cache file suffix and the validated reader
(:class:`~featcache.store.cache.FeatureCache`), ``writer`` the one writer of its datasets and the
commit of finished files, ``merge`` the concatenation of cache files into one (the cache of a
sharded extraction, copied or presented in place). Everything else reads and writes caches through
these; no h5py object leaves the package.
"""
