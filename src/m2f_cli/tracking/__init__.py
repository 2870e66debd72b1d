"""``--track``: link the instances of consecutive frames (of a video, or of the images of one folder
in name order) into tracks, so that the same object keeps one ``track_id`` from frame to frame.

masks.py: the masks as the tracker compares them (a coarse grid, shifted, IoU matrices, packed for
the journal); tracker.py: the association (Hungarian on mask IoU, three stages) and the tracks'
state; stage.py: the run's tracking stage between the engine and the writers (one tracker per
sequence, duplicates merged, ids and the instance map renumbered, the state handed to the frames
journal so that a resumed video continues its tracks); colors.py: a track's colour. docs/tracking.md.
"""
