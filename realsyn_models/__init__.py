"""Model wrappers: load once per Python worker, pick the device, batch, return numpy.

Nothing here imports `etl` or creates a SparkSession; pyspark is only touched lazily by
`device.pick_device` to read a running task's GPU addresses.
"""
