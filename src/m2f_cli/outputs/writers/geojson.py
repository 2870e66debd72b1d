"""``--format geojson``: one GeoJSON FeatureCollection per image, ``<out>/<name>.geojson``.

One Feature per object: ``{"type": "Feature", "id", "geometry": Polygon or MultiPolygon (every part,
holes kept, rings closed, exterior rings counter-clockwise and holes clockwise in the coordinates'
own axes, RFC 7946's right-hand rule), "properties": {"id", "label", "category_id", "score"}}``.
The collection also carries ``"image"``, ``"name"``, ``"width"``, ``"height"`` and ``"coordinates"``:

- ``"pixel"``: pixel-corner coordinates of the original image (polygons.py), x right, y down (a GIS
  shows them upside down, as it puts y up);
- ``"crs"``: the input is a georeferenced GeoTIFF and rasterio (``pip install 'm2f[geo]'``) is
  installed: every vertex goes through the raster's affine transform (which maps pixel corners, the
  convention here) into its CRS, named in a top-level ``"crs"`` member (``urn:ogc:def:crs:EPSG::<code>``,
  or the CRS's WKT), the 2008 GeoJSON member GDAL, QGIS and geopandas read. RFC 7946 GeoJSON is
  WGS 84 only; reproject with ``ogr2ogr -t_srs EPSG:4326`` when a consumer needs it.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Optional

from m2f_cli.records import ImageResult
from m2f_cli.urls import local_path
from m2f_cli.outputs.writers.base import register
from m2f_cli.outputs.writers.vector import PerImagePolygonWriter, number

log = logging.getLogger(__name__)

TIFF_EXTENSIONS = (".tif", ".tiff")


def georeference(path: str, width: int, height: int) -> Optional[tuple[tuple[float, ...], str]]:
    """(affine [a, b, d, e, xoff, yoff] for shapely, CRS name) of a georeferenced raster of this size,
    else None. Raises ImportError without rasterio."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                crs, t, size = src.crs, src.transform, (src.width, src.height)
        except (rasterio.errors.RasterioError, OSError):
            return None
    if crs is None or t.is_identity:
        return None
    if size != (width, height):  # rotated by an orientation tag, or not the raster we decoded
        log.warning("%s: raster is %dx%d but was decoded as %dx%d; GeoJSON left in pixel coordinates",
                    path, size[0], size[1], width, height)
        return None
    epsg = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
    return (t.a, t.b, t.d, t.e, t.c, t.f), name


def _geometry(parts, affine) -> dict:
    from shapely.affinity import affine_transform
    from shapely.geometry import MultiPolygon, Polygon, mapping
    from shapely.geometry.polygon import orient

    polys = [Polygon(p.exterior, p.holes) for p in parts]
    geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if affine is not None:
        geom = affine_transform(geom, affine)
        # a north-up raster flips y: orient again in the CRS's axes
        geom = (orient(geom, 1.0) if geom.geom_type == "Polygon"
                else MultiPolygon([orient(g, 1.0) for g in geom.geoms]))
    doc = mapping(geom)
    conv = (lambda v: v) if affine is not None else number

    def rings(poly):
        return [[[conv(x), conv(y)] for x, y in ring] for ring in poly]
    if doc["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": rings(doc["coordinates"])}
    return {"type": "MultiPolygon", "coordinates": [rings(p) for p in doc["coordinates"]]}


@register
class GeojsonWriter(PerImagePolygonWriter):
    name = "geojson"
    prefix, suffix = "", ".geojson"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._warned = False

    def _georeference(self, result: ImageResult):
        if not result.ref.path.lower().endswith(TIFF_EXTENSIONS):
            return None
        try:
            return georeference(local_path(result.ref.path), result.width, result.height)
        except ImportError:
            if not self._warned:
                self._warned = True
                log.warning("GeoJSON of TIFF inputs is in pixel coordinates: pip install 'm2f[geo]' "
                            "(rasterio) to georeference GeoTIFFs")
            return None

    def document(self, result: ImageResult) -> dict:
        geo = self._georeference(result)
        affine = geo[0] if geo else None
        features = []
        for s in self.shapes(result):
            props = {"id": s.id, "label": s.label, "category_id": s.category_id,
                     "score": None if s.score is None else round(s.score, 6)}
            if s.track_id is not None:
                props["track_id"] = s.track_id
            features.append({"type": "Feature", "id": s.id, "geometry": _geometry(s.parts, affine),
                             "properties": props})
        doc = {"type": "FeatureCollection", "image": result.ref.path, "name": result.ref.name,
               "width": result.width, "height": result.height,
               "coordinates": "crs" if geo else "pixel"}
        if geo:
            doc["crs"] = {"type": "name", "properties": {"name": geo[1]}}
        doc["features"] = features
        return doc

    def write(self, result: ImageResult) -> None:
        doc = self.document(result)
        self.ctx.folder.write_bytes(self._path(result.ref), json.dumps(doc, ensure_ascii=False).encode())
