"""The HDF5 feature cache: the only package that imports h5py.

``cache`` is the schema and the validated reader (:class:`~featcache.store.cache.FeatureCache`),
``writer`` the one writer of its datasets and the commit of finished files.
"""
