"""Batch functions that Spark calls (mapInPandas / applyInPandas).

Pure pandas / numpy / arrow in and out: no SparkSession is created or imported here, so every
function can be tested on plain pandas batches.
"""
