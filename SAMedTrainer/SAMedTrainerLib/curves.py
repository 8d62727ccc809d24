"""Live training curves as MRML nodes (table + plot series + plot chart), without Qt."""
from __future__ import annotations

__all__ = ["TrainingCurves"]


class TrainingCurves:
    """Loss and validation-Dice curves as MRML table + plot series + plot chart nodes.

    The widget shows ``chartNode`` in a plot view; headless it is just data in the scene.
    """

    def __init__(self, scene, name: str = "SAMed training"):
        import vtk

        self.scene = scene
        self.iterations: list[float] = []
        self.losses: list[float] = []
        self.val_iterations: list[float] = []
        self.val_dice: list[float] = []
        self.lossTable = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} loss"))
        self.diceTable = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} Dice"))
        self._loss_columns = self._columns(self.lossTable, ("iteration", "loss"), vtk)
        self._dice_columns = self._columns(self.diceTable, ("iteration", "mean Dice"), vtk)
        self.lossSeries = self._series(f"{name} loss", self.lossTable, "loss", (0.1, 0.3, 0.8))
        self.diceSeries = self._series(f"{name} validation Dice", self.diceTable, "mean Dice", (0.9, 0.4, 0.1))
        self.chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
        self.chartNode.AddAndObservePlotSeriesNodeID(self.lossSeries.GetID())
        self.chartNode.AddAndObservePlotSeriesNodeID(self.diceSeries.GetID())
        self.chartNode.SetTitle("SAMed training")
        self.chartNode.SetXAxisTitle("iteration")
        self.chartNode.SetYAxisTitle("loss / Dice")

    @staticmethod
    def _columns(table_node, names, vtk):
        arrays = []
        for column_name in names:
            array = vtk.vtkDoubleArray()
            array.SetName(column_name)
            table_node.AddColumn(array)
            arrays.append(array)
        return arrays

    def _series(self, name, table_node, y_column, color):
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", self.scene.GenerateUniqueName(name))
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName(y_column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetColor(*color)
        return series

    @staticmethod
    def _fill(table_node, arrays, columns):
        table = table_node.GetTable()
        for array, values in zip(arrays, columns):
            array.SetNumberOfTuples(len(values))
            for i, v in enumerate(values):
                array.SetValue(i, v)
            array.Modified()
        table.Modified()
        table_node.Modified()

    def update(self, event: dict) -> None:
        if event.get("event") == "iteration" and event.get("loss") is not None:
            self.iterations.append(float(event["iteration"]))
            self.losses.append(float(event["loss"]))
            self._fill(self.lossTable, self._loss_columns, (self.iterations, self.losses))
        elif event.get("event") == "validation" and event.get("mean_dice") is not None:
            self.val_iterations.append(float(event["iteration"]))
            self.val_dice.append(float(event["mean_dice"]))
            self._fill(self.diceTable, self._dice_columns, (self.val_iterations, self.val_dice))

    def remove(self) -> None:
        for node in (self.chartNode, self.lossSeries, self.diceSeries, self.lossTable, self.diceTable):
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
