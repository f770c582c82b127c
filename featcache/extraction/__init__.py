"""Extraction: source -> frozen backbone -> store, once.

``plan`` works out what an extraction is (options, backbone, layers, fingerprint, file name);
``reuse`` finds what earlier runs already computed; ``loading`` decodes the rows still to compute
into batches; ``partial`` keeps finished batches of an unfinished run; ``pipeline`` runs the loop
and assembles the cache; ``shards`` and ``distributed`` split the work over processes and machines.
"""
