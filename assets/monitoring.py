"""What the monitoring loop watches: the traffic the served model answers."""

import dagster as dg

served_traffic = dg.AssetSpec(
    "served_traffic",
    group_name="monitoring",
    description="Requests to the served model (the inference log under .tuneline/). data_drift_sensor "
    "records each window's drift score here as an observation, so it charts over time.",
    kinds={"sqlite"},
)
