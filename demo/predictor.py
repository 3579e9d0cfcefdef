"""Run ISDA on images and videos and draw the predictions with Detectron2's visualizers."""
import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from isda.predictor import ISDAPredictor


def dataset_metadata(cfg):
    """Metadata of ``DATASETS.TEST[0]`` with its ``thing_classes`` (datasets that take their
    class names from their annotation file get loaded once to fill them)."""
    if not len(cfg.DATASETS.TEST):
        return MetadataCatalog.get("__unused")
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    if not meta.get("thing_classes") and name in DatasetCatalog.list():
        DatasetCatalog.get(name)
    return meta


def drawing_scale(height: int, width: int, min_side: int = 512) -> float:
    """Scale of the drawing of a ``height`` x ``width`` image: a short side below ``min_side``
    is enlarged to it (at most 4x), so that labels and outlines stay readable on small images
    (e.g. 128 px microscopy tiles); 1 for large images or ``min_side`` 0."""
    return max(1.0, min(4.0, min_side / max(1, min(height, width))))


def drawing_metadata(metadata, names, num_classes: int):
    """``metadata`` if its class names are ``names``; else metadata naming the classes
    ``names`` when they cover all ``num_classes`` the model predicts, or none (numbers drawn)."""
    names = list(names or [])
    if len(names) < num_classes:
        return MetadataCatalog.get("__isda_demo_no_names")
    if names == list(metadata.get("thing_classes", [])):
        return metadata
    named = MetadataCatalog.get(f"__isda_demo_names_{abs(hash(tuple(names)))}")
    named.set(thing_classes=names)
    return named


class VisualizationDemo:
    """Predict and draw: :meth:`run_on_image` for one image, :meth:`run_on_video` per frame."""

    def __init__(self, cfg, confidence_threshold=0.3, instance_mode=ColorMode.IMAGE,
                 exported=None, min_drawing_side=512):
        """``exported``: a folder written by ``tools/deploy/export_model.py``; the exported model
        (ONNX in onnxruntime, or ``torch.export``) then predicts instead of the PyTorch model,
        with the class names recorded at export."""
        self.metadata = dataset_metadata(cfg)
        self.image_format = cfg.INPUT.FORMAT
        self.threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.min_drawing_side = min_drawing_side
        if exported:
            from isda.export.onnx_predictor import load_predictor

            self.predictor = load_predictor(exported)
            self.predictor.score_threshold = float(confidence_threshold)  # masks drawn only
            num_classes = int(self.predictor.meta.get("num_classes", 0))
            names = self.predictor.meta.get("class_names") or self.metadata.get("thing_classes")
        else:
            self.predictor = ISDAPredictor(cfg)
            num_classes = cfg.MODEL.ISDA.NUM_CLASSES
            names = self.metadata.get("thing_classes")
        self.metadata = drawing_metadata(self.metadata, names, num_classes)

    def _predict(self, image, image_format):
        instances = self.predictor(image, image_format=image_format)["instances"].to("cpu")
        instances = instances[instances.scores >= self.threshold]
        if not instances.has("pred_boxes") and instances.has("pred_masks"):
            instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
        return instances

    def run_on_image(self, image):
        """image: [H, W, 3] uint8 in ``INPUT.FORMAT`` (as ``read_image(format=...)`` returns) ->
        (kept Instances, VisImage)."""
        instances = self._predict(image, self.image_format)
        rgb = image if self.image_format == "RGB" else image[:, :, ::-1]
        vis = Visualizer(rgb, self.metadata, scale=drawing_scale(*rgb.shape[:2], self.min_drawing_side),
                         instance_mode=self.instance_mode)
        return instances, vis.draw_instance_predictions(instances)

    def run_on_video_with_instances(self, video):
        """video: an opened ``cv2.VideoCapture`` -> yields (kept Instances, drawn frame (BGR,
        uint8)) per frame."""
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = self._predict(frame, "BGR")
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            drawn = visualizer.draw_instance_predictions(rgb, instances)
            yield instances, cv2.cvtColor(drawn.get_image(), cv2.COLOR_RGB2BGR)

    def run_on_video(self, video):
        """video: an opened ``cv2.VideoCapture`` -> yields drawn frames (BGR, uint8)."""
        for _, frame in self.run_on_video_with_instances(video):
            yield frame

