"""Running trials: a layout's ranks placed on Ray, run as processes, and ended by one owner."""
