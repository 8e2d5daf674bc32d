"""The `ocr` task's geometry: text boxes from the detector's map, grown, ordered and cut out
upright, as RapidOCR 1.4 does it (same rounding, so the same boxes)."""

from __future__ import annotations

import math

import cv2
import numpy as np


def mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    """The minimum-area rectangle's corners (top-left, top-right, bottom-right, bottom-left
    as PaddleOCR orders them) and its shorter side."""
    rect = cv2.minAreaRect(contour)
    pts = sorted(cv2.boxPoints(rect), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), float(min(rect[1]))


def box_score(pred: np.ndarray, box: np.ndarray) -> float:
    """Mean probability inside the polygon (`box` [k, 2] in map pixels)."""
    h, w = pred.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    shifted = box - np.array([xmin, ymin], dtype=box.dtype)
    cv2.fillPoly(mask, shifted.reshape(1, -1, 2).astype(np.int32), 1)
    return float(cv2.mean(pred[ymin : ymax + 1, xmin : xmax + 1], mask)[0])


def _round(v: float) -> int:
    """Half away from zero, as Clipper rounds."""
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def unclip(box: np.ndarray, ratio: float, arc_tolerance: float = 0.25) -> np.ndarray:
    """The polygon grown by area * ratio / perimeter, with rounded corners: the points
    pyclipper's PyclipperOffset (JT_ROUND, closed polygon) gives, as PaddleOCR's DB
    post-processing uses it (same integer corners, arc steps and rounding; the tests check
    the convex hulls are equal), without pyclipper and shapely."""
    x, y = box[:, 0].astype(np.float64), box[:, 1].astype(np.float64)
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    perimeter = float(np.hypot(np.roll(x, -1) - x, np.roll(y, -1) - y).sum())
    delta = area * ratio / perimeter if perimeter > 0 else 0.0
    pts: list[tuple[int, int]] = []
    for px, py in box:  # Clipper takes integer points: the float corners are truncated
        p = (int(px), int(py))
        if not pts or pts[-1] != p:
            pts.append(p)
    while len(pts) > 1 and pts[-1] == pts[0]:
        pts.pop()
    if len(pts) < 3 or delta <= 0:
        return np.array(pts, dtype=np.int32)
    n = len(pts)
    # Clipper's orientation: grow outwards whichever way the corners run.
    signed = sum((pts[i - 1][0] + pts[i][0]) * (pts[i - 1][1] - pts[i][1]) for i in range(n))
    if -0.5 * signed < 0:
        pts.reverse()
    tol = arc_tolerance if 0 < arc_tolerance <= delta * 0.25 else delta * 0.25
    steps = min(math.pi / math.acos(1 - tol / delta), delta * math.pi)
    sin_step, cos_step = math.sin(2 * math.pi / steps), math.cos(2 * math.pi / steps)
    steps_per_rad = steps / (2 * math.pi)
    normals = []
    for j in range(n):
        dx, dy = pts[(j + 1) % n][0] - pts[j][0], pts[(j + 1) % n][1] - pts[j][1]
        f = 1.0 / math.hypot(dx, dy)
        normals.append((dy * f, -dx * f))
    out: list[tuple[int, int]] = []

    def at(sx: int, sy: int, nx: float, ny: float) -> tuple[int, int]:
        return _round(sx + nx * delta), _round(sy + ny * delta)

    k = n - 1
    for j in range(n):
        (kx, ky), (jx, jy), (sx, sy) = normals[k], normals[j], pts[j]
        sin_a = kx * jy - jx * ky
        cos_a = kx * jx + ky * jy
        if abs(sin_a * delta) < 1.0 and cos_a > 0:
            out.append(at(sx, sy, kx, ky))
        elif sin_a * delta < 0:
            out += [at(sx, sy, kx, ky), (sx, sy), at(sx, sy, jx, jy)]
        else:
            sin_a = max(-1.0, min(1.0, sin_a))
            count = max(_round(steps_per_rad * abs(math.atan2(sin_a, cos_a))), 1)
            nx, ny = kx, ky
            for _ in range(count):
                out.append(at(sx, sy, nx, ny))
                nx, ny = nx * cos_step - sin_step * ny, nx * sin_step + ny * cos_step
            out.append(at(sx, sy, jx, jy))
        k = j
    return np.array(out, dtype=np.int32)


def order_clockwise(pts: np.ndarray) -> np.ndarray:
    by_x = pts[np.argsort(pts[:, 0]), :]
    left, right = by_x[:2, :], by_x[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def sorted_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Top to bottom; boxes whose tops are within 10 pixels, left to right."""
    out = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(out) - 1):
        for j in range(i, -1, -1):
            if abs(out[j + 1][0][1] - out[j][0][1]) < 10 and out[j + 1][0][0] < out[j][0][0]:
                out[j], out[j + 1] = out[j + 1], out[j]
            else:
                break
    return out


def crop(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    width = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points.astype(np.float32), target)
    out = cv2.warpPerspective(img, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE,
                              flags=cv2.INTER_CUBIC)
    if out.shape[0] / out.shape[1] >= 1.5:
        out = np.rot90(out)
    return np.asarray(out)


def scaled_to_32(img: np.ndarray, ratio: float) -> np.ndarray | None:
    h, w = img.shape[:2]
    new_h = round(int(h * ratio) / 32) * 32
    new_w = round(int(w * ratio) / 32) * 32
    if new_h <= 0 or new_w <= 0:
        return None
    return np.asarray(cv2.resize(img, (new_w, new_h)))
