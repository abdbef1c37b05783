"""SqlObjects: the stored objects and DEFINERs an SQL dump creates, read at line starts."""

from __future__ import annotations

import pytest

from agent.restore.sql_objects import SqlObjects

DUMP = b"""CREATE TABLE `FUNCTION` (a int);
INSERT INTO `t` VALUES ('CREATE TRIGGER x\\nCREATE PROCEDURE y');
/*!50003 CREATE*/ /*!50017 DEFINER=`root`@`localhost`*/ /*!50003 TRIGGER `tr` BEFORE INSERT ON `t` FOR EACH ROW SET NEW.a = 1 */;;
CREATE DEFINER=`app`@`%` PROCEDURE `p`()
CREATE DEFINER=`root`@`localhost` FUNCTION `f`() RETURNS int(11)
/*!50106 CREATE*/ /*!50117 DEFINER=`root`@`localhost`*/ /*!50106 EVENT `e` ON SCHEDULE
/*!50001 VIEW `v` AS SELECT 1 */;
"""  # noqa: E501


@pytest.mark.parametrize("piece", [1, 7, 64, len(DUMP)])
def test_every_kind_and_definer_is_found_however_the_stream_is_cut(piece: int) -> None:
    objects = SqlObjects()
    for start in range(0, len(DUMP), piece):
        objects.feed(DUMP[start:start + piece])
    assert objects.kinds == {"trigger", "procedure", "function", "event", "view"}
    assert objects.definers == {"`root`@`localhost`", "`app`@`%`"}


def test_tables_and_data_that_mention_routines_are_not_routines() -> None:
    objects = SqlObjects()
    objects.feed(DUMP.split(b"\n", 2)[0] + b"\n" + DUMP.split(b"\n", 2)[1] + b"\n")
    assert objects.kinds == set()
    assert objects.definers == set()
