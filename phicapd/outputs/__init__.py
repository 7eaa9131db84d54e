"""Outputs: everything a caption becomes on disk, for the daemon's writer and for phicapctl.

* ``naming``: which sidecar base each image of a directory gets (the rule and the claims);
* ``freshness``: whether the ``existing`` policy keeps an output as it is;
* ``atomic``: writing a file so that a crash leaves the old one or the new one;
* ``provenance``: what made a caption (the JSON sidecar's fields, the settings key);
* ``root``: a root's outputs of one image (``RootOutputs``): their files, what they hold, which
  the policy keeps.
"""
