"""Outputs: everything a caption becomes on disk, for the daemon's writer and for phicapctl.

* ``naming``: which sidecar base each image of a directory gets (the rule and the claims);
* ``freshness``: whether the ``existing`` policy keeps an output as it is;
* ``atomic``: writing a file so that a crash leaves the old one or the new one;
* ``provenance``: what made a caption (the JSON sidecar's fields, the settings key);
* ``root``: a root's outputs of one image (``RootOutputs``): their files, what they hold, which
  the policy keeps;
* ``formats``: one module per format;
* ``metadata``: XMP sidecars and embedded descriptions through exiv2, in a worker process
  (``exiv2_worker``, ``exiv2_supervisor``, ``worker_protocol``; ``makernotes``, ``placeholders``);
* ``safe_files``: only regular files are read or replaced, each kind within its size cap.

The package imports only ``config``, ``errors``, ``log`` and leaf helpers (``fsnames``, the
version): the pipeline and phicapctl stand on it, never the other way round. This module imports
nothing, so a worker process (``-m phicapd.outputs.exiv2_worker``) starts light.
"""
