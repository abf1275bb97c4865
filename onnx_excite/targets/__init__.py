"""Deployment targets of a built companion model: :func:`.export.export` walks
:data:`.export.TARGETS` (:mod:`.plain`, :mod:`.fp16`, :mod:`.triton`)."""
