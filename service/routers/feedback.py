"""``POST /v1/feedback``: labelled outcomes of served requests -> online logloss and calibration."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter
from starlette.responses import Response

from service.encoding import ApiError, error_item
from service.http import JSONBytes
from service.monitoring import Served
from service.schemas import ErrorResponse, FeedbackRequest, FeedbackResponse
from service.state import State

router = APIRouter(tags=["monitoring"])


@router.post(
    "/v1/feedback", response_model=FeedbackResponse, responses={422: {"model": ErrorResponse}},
    summary="Labels for served request ids (each request id is accepted once)",
)
async def feedback(svc: State, body: FeedbackRequest) -> Response:
    taken: list[tuple[int, Served]] = []
    unknown: list[str] = []
    for i, outcome in enumerate(body.outcomes):
        served = svc.feedback.take(outcome.request_id)
        if served is None:
            unknown.append(outcome.request_id)
            continue
        if len(outcome.labels) != served.ctr.size:
            # Put back what this call took: a rejected request must not consume anything.
            svc.feedback.put(outcome.request_id, served.ctr, served.version)
            for j, earlier in taken:
                svc.feedback.put(body.outcomes[j].request_id, earlier.ctr, earlier.version)
            raise ApiError(422, [error_item(
                ["outcomes", i, "labels"],
                f"request {outcome.request_id} scored {served.ctr.size} instance(s), "
                f"got {len(outcome.labels)} label(s)",
                "length_mismatch",
            )])
        taken.append((i, served))
    accepted = 0
    for i, served in taken:
        labels = body.outcomes[i].labels
        known = np.array([y is not None for y in labels])
        if known.any():
            y = np.array([y for y in labels if y is not None], dtype=np.float64)
            svc.monitor.record_feedback(served.ctr[known], y)
            accepted += int(known.sum())
    return JSONBytes({"accepted_labels": accepted, "unknown_request_ids": unknown})
