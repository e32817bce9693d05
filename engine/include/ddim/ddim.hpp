#pragma once
// Umbrella header of the ddim engine.
#include "ddim/error.hpp"
#include "ddim/model.hpp"
#include "ddim/schedule.hpp"
#include "ddim/session.hpp"
#include "ddim/toolkit.hpp"
