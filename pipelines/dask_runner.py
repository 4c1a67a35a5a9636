"""Beam's DaskRunner, fixed where beam-enrich's pipeline needs it: `--runner dask`.

Beam's own `apache_beam.runners.dask.dask_runner.DaskRunner` (2.77) turns each step into
Dask Bag operations. Four of its gaps break or serialize this pipeline, so this subclass
translates those steps itself and keeps the rest (`Create`, `GroupByKey`, `Flatten`):

- A step with several outputs (`with_outputs`) hands every consumer all of them: the
  work-item reader would get the file records. Here each output bag holds `(tag, value)`
  and each consumer selects its own tag.
- `Reshuffle` is a no-op there, so the work items stay in the one partition the listing
  started in, and one worker enriches everything. Here it gathers the (small) elements
  and splits them into many partitions, which the scheduler hands to every worker.
- It collects a partition's outputs before `finish_bundle`, dropping what that emits,
  and shares one output list between tasks of a worker's threads. Here each partition
  gets its own receivers, and `finish_bundle`'s outputs are kept.
- Its result has no metrics. Here each partition runs its DoFns in a Beam metrics
  container and publishes the container's totals as a Dask event, per task and step;
  the driver keeps the latest totals of each, so a task rerun after a worker died
  replaces its lost attempt instead of adding to it.

Before submitting, the driver checks that workers exist and can import beam-enrich and
apache_beam (`pipelines.runners.WorkerStartError` when not, within
`--worker_start_timeout_s`), and it closes its client when the job ends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import threading
import time
import typing as t

import apache_beam as beam
import dask
from apache_beam.metrics.cells import DistributionData, DistributionResult
from apache_beam.metrics.execution import MetricKey, MetricResult, MetricsContainer
from apache_beam.metrics.metric import MetricResults
from apache_beam.metrics.metricbase import MetricName
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask import dask_runner, transform_evaluator
from apache_beam.runners.dask.overrides import _Reshuffle, dask_overrides
from apache_beam.runners.runner import PipelineState
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils.counters import CounterFactory

from pipelines.runners import ClusterOptions, WorkerStartError

__all__ = ["DaskRunner", "DaskRunnerResult"]

_LOG = logging.getLogger(__name__)

#: The Dask event topic partitions publish their metric totals on.
METRICS_TOPIC = "beam-enrich-metrics"

#: Seconds between two metric reports of a running partition (and its last one).
_REPORT_INTERVAL_S = 2.0

#: A `Reshuffle`d collection is split into this many partitions per worker thread, at
#: least `_MIN_PARTITIONS`: the scheduler hands each to whichever worker is free, so
#: smaller pieces even out items of different sizes. Empty ones cost one tiny task.
_PARTITIONS_PER_THREAD = 4
_MIN_PARTITIONS = 16

_MAIN = None  # the tag of a step's main output

#: The shortest wait for the scheduler to answer (`--dask_connection_timeout` replaces it).
_CONNECT_TIMEOUT_S = 30


def _select(partition: t.Iterable, tag: str | None) -> list:
    """The values of one output tag in a partition of `(tag, value)` pairs."""
    return [value for out_tag, value in partition if out_tag == tag]


class _Receiver(Receiver):
    """Collects a DoFn's outputs of one tag as `(tag, value)` pairs."""

    def __init__(self, tag: str | None, values: list):
        self._tag = tag
        self._values = values

    def receive(self, windowed_value) -> None:
        self._values.append((self._tag, windowed_value.value))


class _Receivers(dict):
    """Tag -> receiver, made on first use (the output handler asks by tag)."""

    def __init__(self, values: list):
        super().__init__()
        self._values = values

    def __missing__(self, tag):
        receiver = self[tag] = _Receiver(tag, self._values)
        return receiver


def _report(step: str, container: MetricsContainer) -> None:
    """Publishes a partition's metric totals for `step` as a Dask event, when on a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # Dask's local schedulers: no worker, no events
        return
    updates = container.get_cumulative()
    counters = [
        [key.metric.namespace, key.metric.name, value] for key, value in updates.counters.items()
    ]
    distributions = [
        [key.metric.namespace, key.metric.name, d.sum, d.count, d.min, d.max]
        for key, d in updates.distributions.items()
    ]
    worker.log_event(
        METRICS_TOPIC,
        {
            "task": str(worker.get_current_task()),
            "step": step,
            "counters": counters,
            "distributions": distributions,
        },
    )


def _run_dofn_on_partition(
    items, step, make_dofn, handler_args, invoker_kwargs, side_specs, *side_values
) -> list:
    """Runs one DoFn over one Dask partition, as one bundle; returns `(tag, value)` pairs.

    `side_values` holds each side input's elements, computed by Dask before this task.
    """
    side_inputs = [
        SideInputMap(view, options, [transform_evaluator.get_windowed_value(v, None) for v in vs])
        for (view, options), vs in zip(side_specs, side_values, strict=True)
    ]
    window_fn = handler_args["window_fn"]
    values: list = []
    receivers = _Receivers(values)
    handler = _OutputHandler(
        main_receivers=receivers[_MAIN], tagged_receivers=receivers, **handler_args
    )
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(make_dofn()), handler, side_inputs=side_inputs, **invoker_kwargs
    )
    container = MetricsContainer(step)
    sampler = statesampler.StateSampler("", CounterFactory())
    statesampler.set_current_tracker(sampler)
    last_report = time.monotonic()
    with sampler.scoped_state(step, "process", metrics_container=container):
        invoker.invoke_setup()
        invoker.invoke_start_bundle()
        for item in items:
            invoker.invoke_process(transform_evaluator.get_windowed_value(item, window_fn))
            if time.monotonic() - last_report >= _REPORT_INTERVAL_S:
                _report(step, container)
                last_report = time.monotonic()
        invoker.invoke_finish_bundle()
        invoker.invoke_teardown()
    statesampler.set_current_tracker(None)
    _report(step, container)
    return values


class _ParDo(transform_evaluator.DaskBagOp):
    """A ParDo over every partition of its input, outputs tagged (see the module doc)."""

    def apply(self, input_bag, side_inputs=None):
        """`side_inputs`: (side input, a Delayed of its elements) pairs."""
        transform = t.cast(beam.ParDo, self.transform)
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        handler_args = {
            "window_fn": window_fn,
            "per_element_output_counter": None,
            "output_batch_converter": None,
            "process_yields_batches": False,
            "process_batch_yields_elements": False,
        }
        invoker_kwargs = {
            "context": DoFnContext(transform.label, state=None),
            "input_args": list(args),
            "input_kwargs": kwargs,
            "user_state_context": None,
            "bundle_finalizer_param": beam.DoFn.BundleFinalizerParam(),
        }
        return input_bag.map_partitions(
            _run_dofn_on_partition,
            self.applied.full_label,
            # A fresh DoFn per partition, as a runner deserializes one per bundle.
            functools.partial(_copy_of, transform.fn),
            handler_args,
            invoker_kwargs,
            [(type(si), si._view_options()) for si, _ in side_inputs or ()],
            *(values for _, values in side_inputs or ()),
        )


def _concatenate(partitions: list) -> list:
    return [value for partition in partitions for value in partition]


def _copy_of(fn):
    from apache_beam.internal import pickler

    return pickler.loads(pickler.dumps(fn))


class _Spread(transform_evaluator.DaskBagOp):
    """`Reshuffle`: gathers the elements and splits them over `partitions` partitions."""

    partitions: int = _MIN_PARTITIONS

    def apply(self, input_bag, side_inputs=None):
        return input_bag.repartition(npartitions=1).repartition(npartitions=self.partitions)


def _spread_op(partitions: int) -> type[_Spread]:
    return type("_Spread", (_Spread,), {"partitions": partitions})


@dataclasses.dataclass
class _BagVisitor(beam.pipeline.PipelineVisitor):
    """Translates each step to a Dask Bag, selecting each consumer's output tag."""

    translations: dict
    bag_kwargs: dict
    bags: dict = dataclasses.field(default_factory=dict)
    tagged: set = dataclasses.field(default_factory=set)
    last: t.Any = None

    def _bag_of(self, pcoll):
        producer = pcoll.producer
        bag = self.bags.get(producer)
        if bag is not None and producer in self.tagged:
            bag = bag.map_partitions(_select, pcoll.tag)
        return bag

    def visit_transform(self, node) -> None:
        op_class = self.translations.get(node.transform.__class__, transform_evaluator.NoOp)
        op = op_class(node, bag_kwargs=self.bag_kwargs)
        inputs = list(node.inputs)
        input_bag = None
        if inputs:
            bags = [
                None if isinstance(pcoll, beam.pvalue.PBegin) else self._bag_of(pcoll)
                for pcoll in inputs
            ]
            bags = [bag for bag in bags if bag is not None] or [None]
            flatten = isinstance(op, transform_evaluator.Flatten)
            input_bag = bags if flatten or len(bags) > 1 else bags[0]
        # A side input is a dependency of the task that reads it, computed first. (Beam's
        # DaskRunner computes it inside that task instead, which holds a worker thread
        # while it waits: with one thread per worker, the job stalls.)
        side_inputs = [
            (si, dask.delayed(_concatenate)(self._bag_of(si.pvalue).to_delayed()))
            for si in node.side_inputs
        ]
        bag = op.apply(input_bag=input_bag, side_inputs=side_inputs)
        self.bags[node] = bag
        if isinstance(op, _ParDo):
            self.tagged.add(node)
            bag = bag.map_partitions(_select, _MAIN)
        self.last = bag


class _DaskMetrics(MetricResults):
    """The metrics partitions published, the latest totals of each task and step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str], dict] = {}

    def add_event(self, event) -> None:
        _, report = event
        with self._lock:
            self._totals[report["task"], report["step"]] = report

    def query(self, filter=None):
        counters: dict[MetricKey, int] = {}
        distributions: dict[MetricKey, DistributionData] = {}
        with self._lock:
            reports = list(self._totals.values())
        for report in reports:
            step = report["step"]
            for namespace, name, value in report["counters"]:
                key = MetricKey(step, MetricName(namespace, name))
                counters[key] = counters.get(key, 0) + value
            for namespace, name, *data in report["distributions"]:
                key = MetricKey(step, MetricName(namespace, name))
                found = DistributionData(*data)
                distributions[key] = (
                    distributions[key].combine(found) if key in distributions else found
                )
        return {
            self.COUNTERS: [
                MetricResult(key, value, value)
                for key, value in counters.items()
                if self.matches(filter, key)
            ],
            self.DISTRIBUTIONS: [
                MetricResult(key, DistributionResult(data), DistributionResult(data))
                for key, data in distributions.items()
                if self.matches(filter, key)
            ],
            self.GAUGES: [],
        }


class DaskRunnerResult(dask_runner.DaskRunnerResult):
    """A job on Dask: waits, cancels, reports metrics, and closes its client when done."""

    def __init__(self, client, futures, metrics: _DaskMetrics):
        super().__init__(client, futures)
        self._metrics = metrics

    def wait_until_finish(self, duration=None) -> str:
        try:
            state = super().wait_until_finish(duration)
            if state == PipelineState.DONE:
                # The scheduler's copy of every report, in order: none still in flight.
                for event in self.client.get_events(METRICS_TOPIC):
                    self._metrics.add_event(event)
            return state
        except BaseException:
            self.client.cancel(self.futures)
            raise
        finally:
            if self._state != PipelineState.RUNNING:
                self.client.close()

    def metrics(self) -> _DaskMetrics:
        return self._metrics


class DaskRunner(dask_runner.DaskRunner):
    """Runs a pipeline on a Dask cluster (`--dask_client_address`; default: a local one)."""

    def run_pipeline(self, pipeline, options: PipelineOptions) -> DaskRunnerResult:
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(dask_runner.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = dask_runner.DaskOptions._extract_bag_kwargs(dask_options)
        if not bag_kwargs:
            # Beam's default, named so that it does not warn that it changed in 2.6x:
            # `Create` here starts from one element (the input listing).
            bag_kwargs["partition_size"] = 128
        timeout_s = options.view_as(ClusterOptions).worker_start_timeout_s
        client = _connect(ddist, dask_options, timeout_s)
        try:
            threads = _check_workers(client, timeout_s)
            partitions = bag_kwargs.get("npartitions") or max(
                _MIN_PARTITIONS, _PARTITIONS_PER_THREAD * threads
            )
            pipeline.replace_all(dask_overrides())
            translations = {
                **transform_evaluator.TRANSLATIONS,
                beam.ParDo: _ParDo,
                _Reshuffle: _spread_op(partitions),
            }
            visitor = _BagVisitor(translations, bag_kwargs)
            pipeline.visit(visitor)
            metrics = _DaskMetrics()
            client.subscribe_topic(METRICS_TOPIC, metrics.add_event)
            futures = client.compute(dask.optimize(visitor.last))
        except BaseException:
            client.close()
            raise
        return DaskRunnerResult(client, futures, metrics)


def _connect(ddist, dask_options: dict, timeout_s: float):
    """A client of the scheduler the options name (a local cluster when they name none)."""
    address = dask_options.get("address") or dask_options.get("scheduler_file")
    # Connecting is not starting: a busy scheduler may take a while to answer.
    options = {"timeout": max(timeout_s, _CONNECT_TIMEOUT_S), **dask_options}
    try:
        return ddist.Client(**options)
    except (OSError, TimeoutError) as err:
        where = address or "a local Dask cluster"
        raise WorkerStartError(
            f"cannot reach the Dask scheduler at {where} ({err}); start it (`dask scheduler`) "
            "or fix --dask_client_address"
        ) from None


def _check_workers(client, timeout_s: float) -> int:
    """Waits for workers and checks that each can import the job's code.

    Returns:
        The workers' threads, in total.

    Raises:
        WorkerStartError: no worker joined within `timeout_s`, or one lacks apache_beam
            or beam-enrich, or has another apache_beam than this process.
    """
    address = client.scheduler.address
    if not client.scheduler_info().get("workers"):
        _LOG.warning("waiting for Dask workers at %s (up to %g s)", address, timeout_s)
        try:
            client.wait_for_workers(1, timeout=timeout_s)
        except (TimeoutError, OSError):
            raise WorkerStartError(
                f"no Dask worker joined the scheduler at {address} within {timeout_s:g} s; "
                f"start workers (`dask worker {address}`) or raise --worker_start_timeout_s"
            ) from None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # By reference to the standard library only: a worker lacking beam-enrich
        # can still run it and say so.
        found = pool.submit(client.run, importlib.util.find_spec, "pipelines", on_error="return")
        versions = pool.submit(
            client.run, importlib.metadata.version, "apache-beam", on_error="return"
        )
        try:
            found, versions = found.result(timeout_s), versions.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise WorkerStartError(
                f"the Dask workers at {address} did not answer within {timeout_s:g} s; "
                "check that they run, or raise --worker_start_timeout_s"
            ) from None
    for worker, spec in sorted(found.items()):
        version = versions.get(worker)
        if isinstance(version, BaseException):
            raise WorkerStartError(
                f"Dask worker {worker} cannot import apache_beam ({version}); install "
                "beam-enrich[dask] in the workers' Python environment"
            )
        if isinstance(spec, BaseException) or spec is None:
            raise WorkerStartError(
                f"Dask worker {worker} cannot import beam-enrich; install beam-enrich[dask] "
                "in the workers' Python environment"
            )
        if version != beam.__version__:
            raise WorkerStartError(
                f"Dask worker {worker} has apache-beam {version}, this driver "
                f"{beam.__version__}; install the same version on both"
            )
    return sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
