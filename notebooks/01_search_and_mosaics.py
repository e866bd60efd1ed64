# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1 · Search Sentinel-2 scenes and make seasonal mosaics
#
# The offline demo region (a synthetic 10 m Sentinel-2 L2A area in central Italy) is served like
# the real thing: a STAC API (`rustac serve`) and the COGs over HTTP with range requests, both on
# loopback. This notebook
#
# 1. attaches to a Dask cluster,
# 2. builds (or reuses) the demo region in `WORKDIR` and starts its servers,
# 3. searches the STAC API and shows every scene's date, cloud cover and processing baseline,
# 4. makes the April, July and September cloud-free mosaics (SCL-masked median, NRG = B08, B04, B03)
#    on the cluster, with the per-pixel count of clear dates,
# 5. maps the mosaics and the clear counts, and checks them.
#
# The mosaics go to `WORKDIR/mosaics/`, where the next notebooks find them.

# %%
import json
from contextlib import ExitStack

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from demo_inputs import SEASON_MONTH, extent_km, open_demo
from IPython.display import HTML, display

from clc_dask.cluster import get_client
from clc_dask.demo import serve_region
from clc_dask.items import boa_offset, processing_baseline
from clc_dask.load import load_scenes
from clc_dask.mosaic import make_mosaic, write_mosaic
from clc_dask.rasters import geobox_of, open_raster
from clc_dask.search import save_item_collection, search_items
from clc_dask.seasons import SEASONS

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the five notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
MAX_CLOUD = 50.0  # eo:cloud_cover (%) above which a scene is left out of the mosaics
CHUNK_SIZE = 256  # dask chunk edge in px
READ_OVER_HTTP = True  # False: read the COGs from WORKDIR (a remote cluster cannot reach loopback)
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores)
THREADS_PER_WORKER = None  # local cluster only

# %% [markdown]
# ## Attach to the cluster
# A scheduler address (parameter or `DASK_SCHEDULER_ADDRESS`) connects to a running cluster;
# without one, a local cluster starts (a CUDA one where GPUs exist). On a remote cluster,
# `WORKDIR` must be on storage the workers share.

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## The demo region and its servers
# A region built earlier in `WORKDIR` with the same size and seed is reused.

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
stack = ExitStack()  # the servers stay up until the last cell closes it
servers = stack.enter_context(serve_region(region))
print(f"region: {region.size} x {region.size} px at {region.resolution:g} m on {region.crs}, "
      f"{len(region.scenes)} scenes, in {region.workdir}")
print(f"STAC API: {servers.stac_url}\nCOGs:     {servers.data_url}")

# %% [markdown]
# ## Search
# One search over the region and year, like a user would ask Earth Search. The demo's STAC API
# (rustac's memory backend) has no `query`/`filter` extension, so `search_items` filters cloud
# cover on the client. The processing baseline decides whether the digital numbers carry the
# +1000 offset that the mosaic removes.

# %%
items = search_items(servers.stac_url, bbox=list(region.bbox_lonlat),
                     datetime=f"{region.year}-01-01/{region.year}-12-31", collection=region.collection_id)
save_item_collection(items, paths.items)
month_season = {m: s for s, m in SEASON_MONTH.items()}
table = pd.DataFrame([{
    "date": item.datetime.date().isoformat(),
    "season": month_season.get(item.datetime.month, ""),
    "platform": item.properties.get("platform"),
    "cloud cover %": round(float(item.properties["eo:cloud_cover"]), 1),
    "baseline": ".".join(f"{v:02d}" for v in processing_baseline(item)),
    "BOA offset (DN)": boa_offset(item),
    "used": float(item.properties["eo:cloud_cover"]) <= MAX_CLOUD,
} for item in items]).sort_values("date", ignore_index=True)
display(table)

# %% [markdown]
# ## Seasonal mosaics on the cluster
# `make_mosaic` is the whole stage in one call: per season it searches the scenes with at most
# `MAX_CLOUD` % cloud, loads them lazily as a uint16 `(time, band, y, x)` cube on the region's
# grid, and reduces them to the median of the clear observations (SCL no data, saturated, cloud
# shadow, clouds and cirrus masked). `write_mosaic` computes it on the cluster and writes COGs
# (and the scenes used, beside them). Watch it on the dashboard.

# %%
display(HTML(f'Dask dashboard: <a href="{client.dashboard_link}" target="_blank">{client.dashboard_link}</a>'))
paths.mosaic("april").parent.mkdir(parents=True, exist_ok=True)
mosaics, scenes_by_season = {}, {}
for season in SEASONS:
    mosaic = make_mosaic(servers.stac_url, grid=region.geobox, season=season, years=[region.year],
                         max_cloud=MAX_CLOUD, collection=region.collection_id, composite="nrg",
                         chunk_size=CHUNK_SIZE)
    if not READ_OVER_HTTP:  # the same scenes, read from the region's folder
        found = {i.id for i in mosaic.attrs["items"]}
        local = [i for i in region.items() if i.id in found]
        mosaic = make_mosaic(items=local, grid=region.geobox, composite="nrg", chunk_size=CHUNK_SIZE)
    write_mosaic(mosaic, paths.mosaic(season))
    # the scenes as a cube, for the checks below
    scenes_by_season[season] = load_scenes(mosaic.attrs["items"], region.geobox, chunk_size=CHUNK_SIZE)
    mosaics[season] = mosaic
    print(f"{season:9s}: {mosaic.attrs['n_dates']} scenes, {mosaic['reflectance'].data.npartitions} chunks "
          f"-> {paths.mosaic(season).name}")

# %% [markdown]
# ## Maps: NRG mosaics and clear counts
# False colour (NIR, red, green; 2–98 % stretch): vegetation is red. The clear count is the
# number of dates whose SCL says the ground was visible.

# %%
written = {s: open_raster(paths.mosaic(s)).values for s in SEASONS}
counts = {s: open_raster(paths.clear_count(s)).values[0] for s in SEASONS}
extent = extent_km(region)
fig, axes = plt.subplots(2, 3, figsize=(13, 8.5), sharex=True, sharey=True, layout="constrained")
for col, season in enumerate(SEASONS):
    nrg = written[season].astype(np.float32)
    valid = nrg.min(axis=0) > 0
    lo, hi = np.percentile(nrg[:, valid], [2, 98], axis=1)
    rgb = np.clip((nrg - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1).transpose(1, 2, 0)
    axes[0, col].imshow(np.where(valid[..., None], rgb, 1.0), extent=extent, interpolation="nearest")
    axes[0, col].set_title(f"{season.capitalize()} NRG mosaic")
    n_dates = scenes_by_season[season].sizes["time"]
    im = axes[1, col].imshow(counts[season], extent=extent, cmap="viridis", vmin=0, vmax=n_dates,
                             interpolation="nearest")
    axes[1, col].set_title(f"{season.capitalize()} clear dates (of {n_dates})")
    fig.colorbar(im, ax=axes[1, col], shrink=0.8, ticks=range(n_dates + 1))
for ax in axes.flat:
    ax.set_xlabel("x (km)")
for ax in axes[:, 0]:
    ax.set_ylabel("y (km)")
plt.show()

# %% [markdown]
# ## Checks
# * every scene of the region was found, each with a date, cloud cover and baseline;
# * the mosaics are uint16 NRG on the region's grid, with data exactly where a date was clear;
# * no cloud is left: no mosaic pixel is as bright in green (B03) as 95 % of the scenes' cloud
#   pixels (SCL 8/9).

# %%
assert len(items) == len(region.scenes), (len(items), len(region.scenes))
assert table["baseline"].str.match(r"^\d{2}\.\d{2}$").all() and table["cloud cover %"].between(0, 100).all()
cloud_checks = {}
for season in SEASONS:
    mosaic, count = written[season], counts[season]
    assert mosaics[season]["reflectance"].dtype == np.uint16 and mosaic.dtype == np.uint16
    assert list(open_raster(paths.mosaic(season))["band"].values) == ["B08", "B04", "B03"]
    assert geobox_of(open_raster(paths.mosaic(season))) == region.geobox
    assert ((mosaic > 0).all(axis=0) == (count > 0)).all(), f"{season}: data must be where a date was clear"
    assert count.max() <= scenes_by_season[season].sizes["time"]
    scl_b03 = scenes_by_season[season].sel(band=["B03", "SCL"]).compute()
    cloudy = np.isin(scl_b03.sel(band="SCL").values, (8, 9))
    b03 = scl_b03.sel(band="B03").values.astype(np.int32) - scl_b03["boa_offset"].values[:, None, None]
    cloud_p05 = float(np.percentile(b03[cloudy], 5))
    brightest = int(mosaic[2][count > 0].max())
    cloud_checks[season] = {"cloudy_scene_pixels": int(cloudy.sum()), "cloud_b03_p05": cloud_p05,
                            "mosaic_b03_max": brightest}
    assert cloudy.any(), f"{season}: the scenes should hold clouds to remove"
    assert brightest < cloud_p05, f"{season}: a mosaic pixel ({brightest} DN) is as bright as clouds ({cloud_p05} DN)"
display(pd.DataFrame(cloud_checks).T)

# %%
stack.close()  # stop the demo servers
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "items": len(items),
    "seasons": {s: {"scenes": scenes_by_season[s].sizes["time"], "mosaic": str(paths.mosaic(s)),
                    "clear_count_max": int(counts[s].max()), "clear_count_min": int(counts[s].min())}
                for s in SEASONS},
    "cloud_checks": cloud_checks,
}
print(json.dumps(summary, indent=1))
