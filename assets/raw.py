"""Raw data: the recipe's input files (and the generated demo data), each with its sha256."""

import dagster as dg

from assets._meta import file_table
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"python"})
def raw_dataset(context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore) -> dg.Output:
    """The recipe's input files (and the generated demo data), each with its sha256. A retrain claims the newly
    labelled files of the incoming folder (moved to ``consumed/``, so no later retrain reuses them)."""
    from tuneline.data.raw import claim, collect_inputs, incoming_files, stage_inputs

    r = recipe.load()
    run_id = context.run.root_run_id or context.run.run_id
    work = artifacts.workspace("raw_dataset", run_id)
    claimed = claim(incoming_files(r), r, run_id) if recipe.retrain else []
    raw = stage_inputs(collect_inputs(r, work.path / "demo", recipe_path=recipe.path, retrain=recipe.retrain,
                                      claimed=claimed), artifacts.shared_uri("inputs"))
    context.log.info(f"{len(raw.files)} input files; claimed {len(claimed)} incoming")
    return dg.Output(raw, metadata={
        "files": file_table(raw.files), "n_files": len(raw.files), "sha256": raw.sha256,
        "incoming_claimed": len(claimed), "recipe": dg.MetadataValue.json(r.to_dict()),
        **{"drift_file": dg.MetadataValue.url(f.uri) for f in raw.by_role("drift")},
    })
