"""The CPU testbed for MASSV (issue 4): a synthetic image-question task (:mod:`testbed.task`)."""
