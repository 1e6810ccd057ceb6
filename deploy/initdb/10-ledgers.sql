CREATE DATABASE dvp_securities;
